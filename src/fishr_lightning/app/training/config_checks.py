"""Checks of the composed config that Hydra does not do (issue 19): a top-level key that no part of
the app reads (``+stpes=100``, the fix Hydra itself suggests for a typo) is refused with the list of
the known keys, instead of being ignored while the run trains the default number of steps."""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources

from omegaconf import DictConfig, OmegaConf

from fishr_lightning.app import AppError

CONFIG_MODULE = "fishr_lightning.app.configs"
# Set by the app itself while it runs (run.py), besides the keys of train.yaml and its groups.
APP_SET_KEYS = frozenset({"num_train_domains"})


@cache
def known_top_level_keys() -> frozenset[str]:
    """The keys of ``train.yaml``, the groups of its defaults list and the dataset's ``backbone``."""
    primary = OmegaConf.create(resources.files(CONFIG_MODULE).joinpath("train.yaml").read_text())
    groups = set()
    for entry in primary.get("defaults", []):
        if isinstance(entry, str):
            continue  # _self_
        groups.update(str(key).split("@")[0] for key in entry if not str(key).startswith("override "))
    keys = {str(key) for key in primary if key not in ("defaults", "hydra")}
    return frozenset(keys | groups | {"backbone"} | APP_SET_KEYS)


def check_top_level_keys(cfg: DictConfig) -> None:
    """An ``AppError`` naming the unknown top-level keys of ``cfg``, the closest known one and all of them.

    The documented extension points add to known nodes (``+callbacks=...``, ``+hparams.lr=...``,
    ``+trainer.precision=...``) or only to ``hydra`` (``+sweep=...``), so they pass."""
    known = known_top_level_keys()
    unknown = sorted(str(key) for key in cfg if key not in known)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        if close:
            hints.append(f"{key}: did you mean {close[0]}={OmegaConf.select(cfg, key, throw_on_missing=False)}?")
    raise AppError(
        f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the app reads none of "
        f"{'them' if len(unknown) > 1 else 'it'}, so it would change nothing. {' '.join(hints)} The top-level "
        f"options are {', '.join(sorted(known - APP_SET_KEYS))}; extensions go into callbacks (+callbacks=NAME), hparams "
        "(+hparams.NAME=...) and trainer (+trainer.NAME=...)."
    )
