"""Any timm model as the app's featurizer (``backbone=timm backbone.name=...`` and the presets of
``configs/backbone/``): the model without its classifier, pooled ``[N, num_features]``; the app puts
its dropout and linear ``classifier`` (the Fishr head) after it.

DomainBed's ERM++ release (July 2024, ``domainbed/networks.py``) builds its default ResNet-50 the
same way (``timm.create_model('resnet50.ram_in1k', pretrained=True)``).
"""

from __future__ import annotations

import difflib
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fishr_lightning.app import AppError
from fishr_lightning.app.training.backbones import freeze_batchnorm_statistics, has_batchnorm

try:
    import timm
    import timm.data
except ImportError:  # the `timm` extra
    timm = None


class TimmFeaturizer(nn.Module):
    """A timm model with its head removed (``num_classes=0``): pooled features ``[N, n_outputs]``.

    Args:
        input_shape: ``(C, H, W)`` of the dataset; ``C`` becomes timm's ``in_chans`` (timm adapts the
            pretrained stem to other channel counts).
        name: a timm model name, optionally with its weight tag (``resnet50.ram_in1k``); any of
            ``timm.list_models()``.
        pretrained: start from timm's weights for that tag (the Hugging Face hub; default ``True``).
        weights_path: a local ``.safetensors`` or ``.pth``/``.pt`` state dict of the same architecture
            in timm's format (e.g. the hub repo's ``model.safetensors``), for machines without internet;
            used instead of the hub. Its classifier weights, if any, are dropped.
        freeze_bn: keep BatchNorm statistics frozen during training (DomainBed's classic ResNet).
            ``None`` (default): frozen when the model has BatchNorm; LayerNorm models are unaffected.
        image_size: the square input size; ``None`` (default): the one of timm's pretrained config.
            Models whose constructor takes ``img_size`` (ViTs) are built at that size, their
            position embeddings resampled from the pretrained ones.
        drop_path_rate: stochastic depth (ViTs, ConvNeXt, ResNets); ``None``: timm's default.
        channels_last: run the model in channels-last memory format (faster CNNs on GPUs).
        compile: ``torch.compile`` the model (``nn.Module.compile``: the state dict keeps its names).
        compile_backend: ``torch.compile``'s backend (default ``"inductor"``).
        model_kwargs: more keyword arguments of ``timm.create_model``.

    ``input_config`` holds the input size, mean and std that the dataset transforms use
    (``timm.data.resolve_data_config``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        name: str,
        pretrained: bool = True,
        weights_path: str | None = None,
        freeze_bn: bool | None = None,
        image_size: int | None = None,
        drop_path_rate: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        require_timm()
        check_model_name(name, pretrained and weights_path is None)
        kwargs = {"num_classes": 0, "in_chans": input_shape[0], **(model_kwargs or {})}
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = create_model(name, pretrained and weights_path is None, image_size, kwargs)
        if weights_path is not None:
            load_weights(self.model, name, Path(weights_path).expanduser())
        self.input_config = input_config(self.model, image_size, input_shape[0])
        self.n_outputs = pooled_features(self.model, name, self.input_config["input_size"])
        self.freeze_bn = has_batchnorm(self.model) if freeze_bn is None else freeze_bn
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile(backend=compile_backend)
        self.train()

    def forward(self, x_NCHW: Tensor) -> Tensor:
        if self.channels_last:
            x_NCHW = x_NCHW.contiguous(memory_format=torch.channels_last)
        return self.model(x_NCHW)

    def train(self, mode: bool = True) -> TimmFeaturizer:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm_statistics(self.model)
        return self


def require_timm() -> None:
    if timm is None:
        raise AppError("backbone=timm needs the timm package: pip install 'fishr-lightning[timm]' (or timm itself).")


def check_model_name(name: str, pretrained: bool) -> None:
    """An architecture timm knows and a weight tag it has (timm refuses unknown tags even without
    ``pretrained``); else close matches."""
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        raise AppError(
            f"backbone.name={name}: timm has no model {architecture!r}. Close names: "
            f"{', '.join(close_model_names(architecture)) or '(none)'}. List them with "
            f"timm.list_models('*{architecture.split('_')[0]}*')."
        )
    tags = timm.list_models(architecture, pretrained=True)
    if pretrained and not tags:
        raise AppError(f"backbone.name={name}: timm has no pretrained weights for it; use backbone.pretrained=false.")
    if tag and name not in tags:
        raise AppError(
            f"backbone.name={name}: timm has no weights tagged {tag!r} for {architecture}; "
            f"its tags are {', '.join(tags) or f'(none: name it {architecture} with backbone.pretrained=false)'}."
        )


def close_model_names(architecture: str, limit: int = 8) -> list[str]:
    """timm's names containing the longest word of ``architecture``, then difflib's closest ones."""
    names = timm.list_models()
    words = sorted(re.split(r"[_\W]+", architecture), key=len, reverse=True)
    containing = timm.list_models(f"*{words[0]}*") if words and words[0] else []
    close = difflib.get_close_matches(architecture, names, n=limit, cutoff=0.6)
    return list(dict.fromkeys(close + containing))[:limit]


def create_model(name: str, pretrained: bool, image_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if image_size is not None:
        try:
            return create_model(name, pretrained, None, {**kwargs, "img_size": image_size})
        except TypeError as error:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(error):
                raise
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ValueError) as error:  # no network: requests/huggingface_hub errors are OSErrors
        if not pretrained:
            raise
        hub_cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(hub_cfg, "hf_hub_id", None) or f"timm/{name}"
        raise AppError(
            f"The pretrained weights of timm's {name} could not be fetched from the Hugging Face hub ({error}). "
            f"Train from scratch with backbone.pretrained=false, or download the hub repo's model.safetensors "
            f"(https://huggingface.co/{hub_id}) on a machine with internet access and pass "
            f"backbone.weights_path=/path/to/model.safetensors."
        ) from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AppError(
            f"backbone.weights_path={path} is not a file. Point it at a .safetensors or .pth state dict of the "
            "model (e.g. the timm hub repo's model.safetensors), or train from scratch with backbone.pretrained=false."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise AppError(f"backbone.weights_path={path} is not a readable state dict ({error}).") from None
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise AppError(f"backbone.weights_path={path} holds a {type(state).__name__}, not a state dict.")
    return state


def load_weights(model: nn.Module, name: str, path: Path) -> None:
    """A local state dict into ``model``, strictly, after timm's own conversion of the file."""
    state = read_state_dict(path)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}  # the model has no classifier
    # timm's per-family converter (e.g. ViTs: original-format checkpoints, position embeddings resampled
    # to the model's img_size); pretrained loading through the hub applies the same one.
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, model)
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError):
            pass  # the strict comparison below reports what does not fit
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong_shape))
            if keys
        ]
        raise AppError(
            f"backbone.weights_path={path} does not match timm's {name}: {'; '.join(problems)}. Pass the weights "
            f"of that architecture in timm's format (timm.create_model({name.split('.')[0]!r}).state_dict(), or "
            f"the hub repo's model.safetensors), or change backbone.name to the file's architecture."
        )
    model.load_state_dict(state, strict=True)


def input_config(model: nn.Module, image_size: int | None, channels: int) -> dict[str, Any]:
    """timm's pretrained input size, mean and std of ``model`` (``image_size`` replaces the size)."""
    config = timm.data.resolve_data_config({}, model=model)
    size = config["input_size"][1:] if image_size is None else (image_size, image_size)
    config["input_size"] = (channels, *size)
    return config


def pooled_features(model: nn.Module, name: str, input_size: Sequence[int]) -> int:
    """The feature width, after checking on one zero input that the output is pooled ``[N, F]``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model(torch.zeros(1, *input_size))
    model.train(was_training)
    if output.dim() != 2:
        raise AppError(
            f"backbone.name={name} gives features of shape {list(output.shape)}, not pooled [N, features]: "
            "the Fishr head needs one vector per image. Choose a model with global pooling (do not set "
            "backbone.model_kwargs.global_pool='' ), or another model."
        )
    return int(output.shape[1])
