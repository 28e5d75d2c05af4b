"""DiWA's training side (Ramé et al., NeurIPS 2022; issue 29): a shared initialisation
(``init=linear_probe|random`` writes ``init.pt``; ``init_from=FILE`` starts a run from it) and
``save_model=best``'s ``model_best.pt``, the weights at the record with the best training-domain
validation accuracy, which ``fishr-soup`` averages across a sweep's runs.

Every file here has ``model.pt``'s format (``model_contents``): ``state_dict``, ``backbone``,
``input_shape``, ``num_classes``, ``hparams``, ``args``, ``step``; ``model_best.pt`` adds ``val_acc``.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from fishr_lightning.app import AppError
from fishr_lightning.app.reporting.records import read_records

INIT_CHOICES = ("linear_probe", "random")
INIT_FILE = "init.pt"
BEST_WEIGHTS_FILE = "model_best.pt"
INIT_FROM_REQUIRED = "required"


def model_contents(
    module: torch.nn.Module,
    backbone: dict[str, Any],
    input_shape: tuple[int, ...] | list[int],
    num_classes: int,
    record: dict[str, Any],
) -> dict[str, Any]:
    """``model.pt``'s dict: the module's weights (on the CPU) and what rebuilds it (``load_model``)."""
    return {
        "state_dict": {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()},
        "backbone": backbone,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "hparams": record.get("hparams", {}),
        "args": record.get("args", {}),
        "step": record.get("step"),
        # What build_algorithm needs besides these (issue 26): DomainBed's name, the training domains, the seed.
        **({"domainbed": module.domainbed_build} if getattr(module, "domainbed_build", None) else {}),
    }


def check_init_options(cfg: DictConfig) -> None:
    """``init`` and ``init_from`` usable, or a clear error."""
    # The diwa sweep preset's `init_from: required` (a `???` would not override train.yaml's null when merged).
    if cfg.get("init_from") == INIT_FROM_REQUIRED:
        raise AppError(
            "init_from is required here (+sweep=diwa: every run starts from one shared initialisation): first "
            "`python train.py init=linear_probe dataset=... test_envs=[k] algorithm=erm hydra.run.dir=inits/NAME`, "
            "then add init_from=inits/NAME/init.pt to this command."
        )
    init = cfg.get("init")
    if init is not None and init not in INIT_CHOICES:
        raise AppError(
            f"init={init}: choose linear_probe (train only the classifier on the frozen featurizer for `steps` "
            "steps, DiWA's linear probing) or random (the untrained weights); either writes init.pt, which later "
            "runs start from with init_from=FILE."
        )
    if init is not None and cfg.averaging.name is not None:
        raise AppError(
            f"init={init} writes the shared initialisation of a DiWA sweep; it does not average weights "
            f"(averaging={cfg.averaging.name}). Drop averaging=... from this command."
        )
    if cfg.get("init_from") is not None and not init_path(cfg).is_file():
        raise AppError(
            f"init_from={cfg.init_from}: no such file. Give the init.pt that `python train.py init=linear_probe` "
            "(or init=random) printed, or a run's model.pt / model_best.pt."
        )


def init_path(cfg: DictConfig) -> Path:
    return Path(str(cfg.init_from)).expanduser().resolve()


def init_args(cfg: DictConfig) -> dict[str, Any]:
    """The args that ``init`` and ``init_from`` add to the run's records, only when set: the runs
    recorded without them keep their args (and their cells in ``fishr-collect``)."""
    args: dict[str, Any] = {}
    if cfg.get("init") is not None:
        args["init"] = cfg.init
    if cfg.get("init_from") is not None:
        path = init_path(cfg)
        args["init_from"] = str(path)
        # fishr-soup groups runs by it: the same bytes, whatever the path (issue 29).
        args["init_sha256"] = file_sha256(str(path), path.stat().st_mtime_ns, path.stat().st_size)
    return args


@functools.lru_cache(maxsize=4)
def file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """The hex sha256 of a file's bytes (cached by path, modification time and size: run_args is built twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_init(
    module: torch.nn.Module, path: Path, backbone: dict[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> None:
    """``init_from``: the file's weights in ``module``, or one error naming what differs."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (any unreadable file: one message)
        raise AppError(
            f"init_from={path}: not a readable model file ({error}); give an init.pt or a model.pt."
        ) from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise AppError(
            f"init_from={path}: not in model.pt's format (a dict with state_dict, backbone, input_shape, num_classes); "
            "give the init.pt of `python train.py init=linear_probe`, or a run's model.pt / model_best.pt."
        )
    differences = []

    def without_pretrained(node: Any) -> Any:  # the weights come from the file, whatever the run loaded first
        return {k: v for k, v in node.items() if k != "pretrained"} if isinstance(node, dict) else node

    if "backbone" in saved and without_pretrained(saved["backbone"]) != without_pretrained(backbone):
        differences.append(f"backbone {saved['backbone']} (this run: {backbone})")
    if "input_shape" in saved and list(saved["input_shape"]) != list(input_shape):
        differences.append(f"input_shape {list(saved['input_shape'])} (this run: {list(input_shape)})")
    if "num_classes" in saved and saved["num_classes"] != num_classes:
        differences.append(f"num_classes {saved['num_classes']} (this run: {num_classes})")
    if hasattr(module, "prepare_for_domainbed_state"):  # Fish's clone, made lazily (issue 26)
        module.prepare_for_domainbed_state(saved["state_dict"])
    state = module.state_dict()
    missing = sorted(set(state) - set(saved["state_dict"]))
    unexpected = sorted(set(saved["state_dict"]) - set(state))
    if missing:
        differences.append(f"missing keys {', '.join(missing)}")
    if unexpected:
        differences.append(f"unexpected keys {', '.join(unexpected)}")
    shapes = [
        f"{name} {list(saved['state_dict'][name].shape)} (this run: {list(tensor.shape)})"
        for name, tensor in state.items()
        if name in saved["state_dict"] and saved["state_dict"][name].shape != tensor.shape
    ]
    if shapes:
        differences.append(f"other shapes: {'; '.join(shapes)}")
    if differences:
        raise AppError(
            f"init_from={path} does not fit this run's model: {'; '.join(differences)}. Start from an "
            "initialisation made with the same dataset and backbone (python train.py init=linear_probe dataset=... "
            "backbone=...)."
        )
    module.load_state_dict(saved["state_dict"])


class FrozenFeaturizer(Callback):
    """``init=linear_probe``: only the classifier trains (DiWA's ``init_step``: Adam over
    ``classifier.parameters()``, with the run's lr and weight decay). The featurizer's parameters
    take no gradient and it stays in eval mode, so its BatchNorm statistics do not move either:
    ``init.pt``'s featurizer is the random (or pretrained) one."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.featurizer.requires_grad_(False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.featurizer.eval()  # after Lightning's module.train() at the start of each epoch


def validation_accuracy(record: dict[str, Any], test_envs: list[int]) -> float | None:
    """DomainBed's training-domain validation: the mean over training domains of ``envK_out_acc``."""
    accuracies = []
    env = 0
    while f"env{env}_out_acc" in record:
        if env not in test_envs:
            accuracies.append(record[f"env{env}_out_acc"])
        env += 1
    return sum(accuracies) / len(accuracies) if accuracies else None


class BestModel(Callback):
    """``save_model=best``: ``model_best.pt`` (``model.pt``'s format, plus ``val_acc``) each time a record
    beats the best training-domain validation accuracy so far (ties keep the earlier record, as
    DomainBed's selection and DiWA's ``model_best.pkl``). Placed after the evaluation callback, whose
    ``last_record`` is the step's record. A resumed run takes the best so far from ``results.jsonl``."""

    def __init__(
        self,
        evaluation: Any,
        path: Path,
        test_envs: list[int],
        backbone: dict[str, Any],
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        self.evaluation = evaluation
        self.path = path
        self.test_envs = test_envs
        self.backbone = backbone
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.best: float | None = None
        self.saved_record: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # after the evaluation's on_train_start dropped the records to train again
            kept = [r for r in read_records(self.path.parent) if r["step"] < trainer.global_step]
            scores = [s for s in (validation_accuracy(r, self.test_envs) for r in kept) if s is not None]
            self.best = max(scores) if scores else None
            self.saved_record = self.evaluation.last_record

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record = self.evaluation.last_record
        if not trainer.is_global_zero or record is None or record is self.saved_record:
            return
        self.saved_record = record
        score = validation_accuracy(record, self.test_envs)
        if score is None or (self.best is not None and score <= self.best):
            return
        self.best = score
        full_record = {**record, "hparams": self.evaluation.writer.hparams, "args": self.evaluation.writer.args}
        contents = model_contents(pl_module, self.backbone, self.input_shape, self.num_classes, full_record)
        contents["val_acc"] = score
        torch.save(contents, self.path)
