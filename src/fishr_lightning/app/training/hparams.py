"""The app's hyperparameters: DomainBed's registry (``fishr_lightning.domainbed.hparams_registry``, moved
there in issue 26 so that ``build_algorithm``'s users get DomainBed's dicts without the app) and the
random-search distributions a run overrides (``hparams_search``, the paper's Table 13).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fishr_lightning.domainbed.hparams_registry import (  # noqa: F401 (the app's names for them)
    ABLATION_HPARAMS,
    ALGORITHMS,
    SMALL_IMAGE_DATASETS,
    Sampler,
    default_hparams,
    hparams_for,
    random_hparams,
    registry,
)
from fishr_lightning.seeds import seed_hash  # noqa: F401

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
