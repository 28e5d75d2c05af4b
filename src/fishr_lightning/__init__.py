"""Fishr (Rame, Dancette & Cord, ICML 2022) for PyTorch Lightning.

Layers, each depending only on the ones before it:
``functional`` (the maths, pure torch) → ``penalty.FishrPenalty`` (state), ``schedule`` (λ_t, the
optimizer reset), ``options.FishrOptions`` (the hyperparameters, documented once), ``distributed``
(cross-rank reduction), ``heads`` (finding the head, reading batches), all pure torch →
``HeadPenaltyCallback`` (what every head penalty shares), ``FishrCallback`` / ``FishrMixin``
(Lightning), ``sampling.DomainBatchSampler`` (per-domain balanced batches) → ``app`` (the Hydra training application). ``diagnostics`` holds measurements that are
not part of the penalty.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "FishrCallback",
    "FishrInputError",
    "FishrMixin",
    "FishrOptions",
    "FishrPenalty",
    "FishrSchedule",
    "HeadPenaltyCallback",
    "penalty_weight_at_step",
    "reset_optimizer_states",
    "LossValley",
    "SWADCallback",
    "DomainBatchSampler",
]

# Imported on first use (PEP 562): `fishr-collect` and the pure-torch core need no Lightning import.
_HOMES = {
    "FishrCallback": "fishr_lightning.callback",
    "FishrMixin": "fishr_lightning.mixin",
    "FishrOptions": "fishr_lightning.options",
    "FishrPenalty": "fishr_lightning.penalty",
    "FishrInputError": "fishr_lightning.functional",
    "SWADCallback": "fishr_lightning.averaging.swad",
    "LossValley": "fishr_lightning.averaging.loss_valley",
    "FishrSchedule": "fishr_lightning.schedule",
    "HeadPenaltyCallback": "fishr_lightning.head_penalty",
    "penalty_weight_at_step": "fishr_lightning.schedule",
    "reset_optimizer_states": "fishr_lightning.schedule",
    "DomainBatchSampler": "fishr_lightning.sampling",
}

if TYPE_CHECKING:
    from fishr_lightning.averaging.loss_valley import LossValley
    from fishr_lightning.averaging.swad import SWADCallback
    from fishr_lightning.callback import FishrCallback
    from fishr_lightning.functional import FishrInputError
    from fishr_lightning.head_penalty import HeadPenaltyCallback
    from fishr_lightning.mixin import FishrMixin
    from fishr_lightning.options import FishrOptions
    from fishr_lightning.penalty import FishrPenalty
    from fishr_lightning.sampling import DomainBatchSampler
    from fishr_lightning.schedule import FishrSchedule, penalty_weight_at_step, reset_optimizer_states


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'fishr_lightning' has no attribute {name!r}")
