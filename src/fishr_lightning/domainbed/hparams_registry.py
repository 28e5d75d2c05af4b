"""DomainBed's hyperparameter registry (``domainbed/hparams_registry.py``): every algorithm's defaults and
random-search distributions, per dataset.

``hparams_seed == 0`` gives the defaults; any other seed a draw from the random-search
distributions. Each hyperparameter draws from its own ``RandomState``, seeded by a hash of
``(seed_hash(hparams_seed, trial_seed), name)``, so adding an algorithm or a hyperparameter never
changes another one's draws (DomainBed issue #169) and ERM and Fishr share their ``lr``,
``batch_size``... draws for the same seeds: paired comparisons. The scheme is DomainBed's, so a
draw here equals DomainBed's for the same names and seeds. NumPy only (``fishr-collect`` imports no torch);
the app's random-search overrides (``hparams_search``) are ``fishr_lightning.app.training.hparams``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fishr_lightning.seeds import seed_hash

# DomainBed's small-image datasets (the embedded synthetic one counts as small: an MLP on vectors).
SMALL_IMAGE_DATASETS = ("Debug28", "RotatedMNIST", "ColoredMNIST", "Synthetic")

Sampler = Callable[[np.random.RandomState], Any]

# DomainBed's names of the algorithms with registered hyperparameters.
ALGORITHMS = ("ERM", "Fishr", "IRM", "VREx", "CORAL", "MMD", "GroupDRO", "Mixup", "SD", "Fish", "MLDG", "MTL", "ARM")

# The Fishr paper's ablations that are options outside DomainBed's registry (issue 26): off unless given
# as +hparams.<name>=..., then recorded with the run's hyperparameters; never drawn, so the registry's
# defaults and draws stay DomainBed's. vrex_ema: "V-REx with EMA" (Tables 9-10), VRExCallback(ema=...).
ABLATION_HPARAMS = {"vrex_ema": 0.0}


def registry(algorithm: str, dataset: str) -> dict[str, tuple[Any, Sampler]]:
    """Each hyperparameter's ``(default, random-search sampler)`` for this algorithm and dataset."""
    small = dataset in SMALL_IMAGE_DATASETS
    hparams: dict[str, tuple[Any, Sampler]] = {
        "data_augmentation": (True, lambda r: True),
        "resnet18": (False, lambda r: False),
        "resnet_dropout": (0.0, lambda r: float(r.choice([0.0, 0.1, 0.5]))),
        "class_balanced": (False, lambda r: False),
        "nonlinear_classifier": (False, lambda r: bool(r.choice([False, False]))),
    }
    if algorithm == "Fishr":
        # Rame et al. 2022, Appendix D / DomainBed's registry. The synthetic default trains for
        # 1500 steps in all: its warm-up is shorter than DomainBed's 1500 (the paper's Colored
        # MNIST script warms up for 190 steps).
        hparams["lambda"] = (1000.0, lambda r: float(10 ** r.uniform(1.0, 4.0)))
        warmup = 300 if dataset == "Synthetic" else 1500
        hparams["penalty_anneal_iters"] = (warmup, lambda r: int(r.uniform(0.0, 5000.0)))
        hparams["ema"] = (0.95, lambda r: float(r.uniform(0.90, 0.99)))
    elif algorithm == "IRM":
        hparams["irm_lambda"] = (1e2, lambda r: float(10 ** r.uniform(-1, 5)))
        hparams["irm_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm == "VREx":
        hparams["vrex_lambda"] = (1e1, lambda r: float(10 ** r.uniform(-1, 5)))
        hparams["vrex_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm in ("CORAL", "MMD"):
        hparams["mmd_gamma"] = (1.0, lambda r: float(10 ** r.uniform(-1, 1)))
    elif algorithm == "GroupDRO":
        hparams["groupdro_eta"] = (1e-2, lambda r: float(10 ** r.uniform(-3, -1)))
    elif algorithm == "Mixup":
        hparams["mixup_alpha"] = (0.2, lambda r: float(10 ** r.uniform(-1, 1)))
    elif algorithm == "SD":
        hparams["sd_reg"] = (0.1, lambda r: float(10 ** r.uniform(-5, -1)))
    elif algorithm == "Fish":
        hparams["meta_lr"] = (0.5, lambda r: float(r.choice([0.05, 0.1, 0.5])))
    elif algorithm == "MLDG":
        hparams["mldg_beta"] = (1.0, lambda r: float(10 ** r.uniform(-1, 1)))
        hparams["n_meta_test"] = (2, lambda r: int(r.choice([1, 2])))
    elif algorithm == "MTL":
        hparams["mtl_ema"] = (0.99, lambda r: float(r.choice([0.5, 0.9, 0.99, 1.0])))
    elif algorithm not in ALGORITHMS:
        raise ValueError(f"No hyperparameters registered for algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)}).")

    if small:
        hparams["lr"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
        hparams["weight_decay"] = (0.0, lambda r: 0.0)
        hparams["batch_size"] = (64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        hparams["lr"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
        hparams["weight_decay"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
        if algorithm == "ARM":  # DomainBed: ARM's support sets are its batches, 8 outside the small images
            hparams["batch_size"] = (8, lambda r: 8)
        elif dataset == "DomainNet":
            hparams["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, 5)))
        else:
            hparams["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, 5.5)))
    return hparams


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
    return {name: default for name, (default, _) in registry(algorithm, dataset).items()}


def random_hparams(
    algorithm: str, dataset: str, seed: int, samplers: dict[str, Sampler] | None = None
) -> dict[str, Any]:
    """A random-search draw; ``samplers`` replace the registry's for some names (``search_space``, issue 26)."""
    samplers = samplers or {}
    return {
        name: samplers.get(name, sampler)(np.random.RandomState(seed_hash(seed, name)))
        for name, (_, sampler) in registry(algorithm, dataset).items()
    }


def hparams_for(
    algorithm: str, dataset: str, hparams_seed: int, trial_seed: int, samplers: dict[str, Sampler] | None = None
) -> dict[str, Any]:
    """The run's hyperparameters: defaults for ``hparams_seed == 0``, else a random-search draw
    seeded by ``(hparams_seed, trial_seed)`` exactly as DomainBed's ``train.py`` seeds it. The defaults
    stay DomainBed's whatever ``samplers`` say: as in DomainBed, a default is not part of the distribution."""
    if hparams_seed == 0:
        return default_hparams(algorithm, dataset)
    return random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed), samplers)
