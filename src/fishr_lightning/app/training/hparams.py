"""DomainBed's hyperparameter registry (``domainbed/hparams_registry.py``) for ERM, Fishr and the
paper's comparison set (IRM, VREx, CORAL, MMD, GroupDRO, Mixup, SD).

``hparams_seed == 0`` gives the defaults; any other seed a draw from the random-search
distributions. Each hyperparameter draws from its own ``RandomState``, seeded by a hash of
``(seed_hash(hparams_seed, trial_seed), name)``, so adding an algorithm or a hyperparameter never
changes another one's draws (DomainBed issue #169) and ERM and Fishr share their ``lr``,
``batch_size``... draws for the same seeds: paired comparisons. The scheme is DomainBed's, so a
draw here equals DomainBed's for the same names and seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fishr_lightning.app.seeding import seed_hash

# DomainBed's small-image datasets (the embedded synthetic one counts as small: an MLP on vectors).
SMALL_IMAGE_DATASETS = ("Debug28", "RotatedMNIST", "ColoredMNIST", "Synthetic")

Sampler = Callable[[np.random.RandomState], Any]

# DomainBed's names of the algorithms with registered hyperparameters.
ALGORITHMS = ("ERM", "Fishr", "IRM", "VREx", "CORAL", "MMD", "GroupDRO", "Mixup", "SD")

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
    elif algorithm not in ALGORITHMS:
        raise ValueError(f"No hyperparameters registered for algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)}).")

    if small:
        hparams["lr"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
        hparams["weight_decay"] = (0.0, lambda r: 0.0)
        hparams["batch_size"] = (64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        hparams["lr"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
        hparams["weight_decay"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
        if dataset == "DomainNet":
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


# Random-search distributions that replace the registry's for one algorithm (issue 26; the paper's Table 13
# compares Fishr's lambda ~ 10^U(1,5) with DomainBed's 10^U(1,4)). The kinds are those DomainBed's registry
# writes as lambdas: r.uniform(a, b), 10**r.uniform(a, b), int(2**r.uniform(a, b)), r.choice([...]), a constant.
# Each consumes its name's RandomState as DomainBed's lambda does, so a new range maps the same uniform number:
# lambda's draw moves from 10^(1 + 3u) to 10^(1 + 4u), and every other name's draw stays DomainBed's.
RANGE_KINDS: dict[str, Callable[[float], Any]] = {
    "uniform": float,
    "log10_uniform": lambda u: float(10**u),
    "log2_uniform": lambda u: float(2**u),
    "int_uniform": int,
    "int_log10_uniform": lambda u: int(10**u),
    "int_log2_uniform": lambda u: int(2**u),
}
DISTRIBUTION_KINDS = (*RANGE_KINDS, "choice", "constant")
SEARCH_EXAMPLE = "+hparams_search.lambda=[log10_uniform,1,5]"


class SearchSpaceError(ValueError):
    """A ``hparams_search`` entry that cannot be read; its message lists what is valid."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def distribution_sampler(where: str, spec: Any) -> tuple[list[Any], Sampler]:
    """``[kind, *parameters]`` (``[log10_uniform, 1, 5]``, ``[choice, 0.0, 0.1, 0.5]``, ``[constant, 0.0]``)
    as ``(the spec to record, a sampler of the registry's form)``; ``where`` names the entry in errors."""
    menu = (
        f"Write +{where}=[KIND,a,b] with KIND one of {', '.join(RANGE_KINDS)} (a draw of r.uniform(a,b), 10**, 2**, "
        f"int(...) as DomainBed's registry writes them; a < b), or +{where}=[choice,v1,v2,...] or "
        f"+{where}=[constant,v] (e.g. {SEARCH_EXAMPLE}; quote it in the shell)."
    )
    if not isinstance(spec, (list, tuple)) or not spec or not isinstance(spec[0], str):
        raise SearchSpaceError(f"{where}={spec!r} is not a distribution. {menu}")
    kind, parameters = spec[0], list(spec[1:])
    if kind in RANGE_KINDS:
        if len(parameters) != 2 or not all(_is_number(p) for p in parameters):
            raise SearchSpaceError(f"{where}: {kind} takes two numbers a < b, got {parameters}. {menu}")
        low, high = float(parameters[0]), float(parameters[1])
        if not low < high:
            raise SearchSpaceError(f"{where}: {kind}({low:g}, {high:g}) needs a < b. {menu}")
        transform = RANGE_KINDS[kind]
        return [kind, low, high], lambda r: transform(r.uniform(low, high))
    if kind == "choice":
        if not parameters:
            raise SearchSpaceError(f"{where}: choice takes one value or more. {menu}")
        # r.choice(n) draws the index that r.choice(values) draws, and keeps each value's Python type.
        return [kind, *parameters], lambda r: parameters[int(r.choice(len(parameters)))]
    if kind == "constant":
        if len(parameters) != 1:
            raise SearchSpaceError(f"{where}: constant takes one value, got {parameters}. {menu}")
        return [kind, parameters[0]], lambda r: parameters[0]
    raise SearchSpaceError(f"{where}: unknown distribution kind {kind!r}. {menu}")


def search_space(search: dict[str, Any], algorithm: str, dataset: str) -> dict[str, tuple[list[Any], Sampler]]:
    """This run's overridden distributions from the ``hparams_search`` node: ``{name: spec}`` for the run's
    algorithm, or ``{Algorithm: {name: spec}}`` (DomainBed's names) for that algorithm's runs only, so one sweep
    over several algorithms can change one of them. Every entry is checked, whichever algorithm it is for."""
    chosen: dict[str, tuple[list[Any], Sampler]] = {}
    own = registry(algorithm, dataset)
    for key, value in search.items():
        if key in ALGORITHMS:
            if not isinstance(value, dict):
                raise SearchSpaceError(
                    f"hparams_search.{key}={value!r}: under an algorithm's name come its hyperparameters, "
                    f"e.g. +hparams_search.{key}.NAME=[log10_uniform,1,5]."
                )
            names = registry(key, dataset)
            for name, spec in value.items():
                entry = _checked_entry(f"hparams_search.{key}.{name}", name, spec, key, names, dataset)
                if key == algorithm:
                    chosen[name] = entry
        else:
            chosen[key] = _checked_entry(f"hparams_search.{key}", key, value, algorithm, own, dataset)
    return chosen


def _checked_entry(where: str, name: str, spec: Any, algorithm: str, names: dict, dataset: str):
    if name not in names:
        owners = [other for other in ALGORITHMS if name in registry(other, dataset)]
        hint = f" It is {', '.join(owners)}'s: write +hparams_search.{owners[0]}.{name}=[...]." if owners else ""
        raise SearchSpaceError(
            f"{where}: {name!r} is not a hyperparameter of {algorithm} on {dataset}; its hyperparameters are "
            f"{', '.join(sorted(names))}, and an entry may also be an algorithm's name ({', '.join(ALGORITHMS)}) "
            f"holding that algorithm's entries.{hint}"
        )
    recorded, sampler = distribution_sampler(where, spec)
    default = names[name][0]
    if isinstance(default, int) and not isinstance(default, bool) and recorded[0] in RANGE_KINDS:
        if not recorded[0].startswith("int_"):
            raise SearchSpaceError(
                f"{where}: {name} is an integer (default {default}); draw it with int_uniform, int_log10_uniform "
                f"or int_log2_uniform, or a choice of integers (e.g. +{where}=[int_uniform,0,5000])."
            )
    return recorded, sampler


def recorded_search_space(search: dict[str, tuple[list[Any], Sampler]]) -> dict[str, list[Any]]:
    """What the run records in ``args.hparams_search``: each overridden name's ``[kind, *parameters]``."""
    return {name: recorded for name, (recorded, _) in sorted(search.items())}
