"""Fishr's comparison set (the baselines of the paper's Tables 3-4), as DomainBed computes them.

``functional`` holds the maths in pure torch; each callback adds one penalty to any LightningModule
through ``HeadPenaltyCallback`` (``fishr_lightning.head_penalty``), so that they compose with
``FishrCallback`` and with each other on one Trainer. Mixup changes the inputs, not the loss of a
head: it is the app's (``fishr_lightning.app.training.module``), with its maths here in ``functional``.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["CORALCallback", "GroupDROCallback", "IRMCallback", "MMDCallback", "SDCallback", "VRExCallback"]

# Imported on first use (PEP 562): the pure-torch functional module needs no Lightning import.
_HOMES = {
    "CORALCallback": "fishr_lightning.baselines.coral",
    "GroupDROCallback": "fishr_lightning.baselines.groupdro",
    "IRMCallback": "fishr_lightning.baselines.irm",
    "MMDCallback": "fishr_lightning.baselines.mmd",
    "SDCallback": "fishr_lightning.baselines.sd",
    "VRExCallback": "fishr_lightning.baselines.vrex",
}

if TYPE_CHECKING:
    from fishr_lightning.baselines.coral import CORALCallback
    from fishr_lightning.baselines.groupdro import GroupDROCallback
    from fishr_lightning.baselines.irm import IRMCallback
    from fishr_lightning.baselines.mmd import MMDCallback
    from fishr_lightning.baselines.sd import SDCallback
    from fishr_lightning.baselines.vrex import VRExCallback


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'fishr_lightning.baselines' has no attribute {name!r}")
