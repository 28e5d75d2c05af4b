"""DomainBed's checkpoints in and out: ``load_domainbed_state_dict`` reads the ``model_dict`` of its
``model.pkl`` (``algorithm.state_dict()``), ``domainbed_state_dict`` writes one that DomainBed's
``algorithm.load_state_dict`` accepts strictly, ``load_domainbed_model`` rebuilds a module from a
``model.pkl`` (issue 26)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, DomainBedError, FeaturizerFactory


def domainbed_state_dict(module: DomainBedAlgorithm) -> dict[str, Tensor]:
    """``module``'s state under DomainBed's keys: what ``DomainBed``'s ``algorithm.load_state_dict`` takes."""
    state = module.state_dict()
    return {key: state[key] for key in module.domainbed_keys(state)}


def load_domainbed_state_dict(module: DomainBedAlgorithm, model_dict: dict[str, Tensor]) -> None:
    """Load DomainBed's ``algorithm.state_dict()`` into ``module``: every key used; a missing or unknown key,
    or a shape that differs, is an error naming it."""
    module.prepare_for_domainbed_state(model_dict)
    state = module.state_dict()
    expected = module.domainbed_keys(state)
    missing = [key for key in expected if key not in model_dict]
    unknown = [key for key in model_dict if key not in expected]
    shapes = [
        f"{key} ({tuple(model_dict[key].shape)} given, {tuple(state[key].shape)} here)"
        for key in expected
        if key in model_dict and tuple(model_dict[key].shape) != tuple(state[key].shape)
    ]
    if missing or unknown or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        if unknown:
            problems.append(f"unknown keys: {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
        if shapes:
            problems.append(f"other shapes: {', '.join(shapes[:8])}{' …' if len(shapes) > 8 else ''}")
        raise DomainBedError(
            f"This state dict is not one of DomainBed's {type(module).__name__} with this module's networks "
            f"({'; '.join(problems)}). Build the module with the algorithm, input shape, number of classes and "
            "domains, hyperparameters (resnet18, nonlinear_classifier, mlp_width…) and featurizer of the run that "
            "saved it."
        )
    module.load_state_dict({**state, **{key: model_dict[key] for key in expected}}, strict=True)


def load_domainbed_model(
    path: str | Path, featurizer: FeaturizerFactory | None = None, seed: int = 0
) -> DomainBedAlgorithm:
    """The module saved in DomainBed's ``model.pkl`` (``args``, ``model_input_shape``, ``model_num_classes``,
    ``model_num_domains``, ``model_hparams``, ``model_dict``), its weights loaded."""
    from fishr_lightning.domainbed.registry import build_algorithm

    saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    try:
        name = saved["args"]["algorithm"]
        input_shape, num_classes = saved["model_input_shape"], saved["model_num_classes"]
        num_domains, hparams, model_dict = saved["model_num_domains"], saved["model_hparams"], saved["model_dict"]
    except (KeyError, TypeError) as error:
        raise DomainBedError(
            f"{path} is not DomainBed's model.pkl (no {error}): it holds args, model_input_shape, "
            "model_num_classes, model_num_domains, model_hparams and model_dict."
        ) from None
    module = build_algorithm(name, input_shape, num_classes, num_domains, hparams, featurizer=featurizer, seed=seed)
    load_domainbed_state_dict(module, model_dict)
    return module
