"""``FishrOptions``: Fishr's hyperparameters and variants, defined and documented once (pure torch).

``FishrCallback(**options)`` and ``FishrMixin.configure_fishr(head, **options)`` both take these
fields as keyword arguments (issue 18, item 10); a plain loop builds its penalty and schedule from
them with ``options.make_penalty()`` and ``options.make_schedule()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fishr_lightning.functional import FishrInputError, LossName, PerSampleLoss, Reduction
from fishr_lightning.penalty import Backend, Covariance, FishrPenalty
from fishr_lightning.schedule import FishrSchedule


@dataclass(frozen=True)
class FishrOptions:
    """Fishr's options (Rame, Dancette & Cord, ICML 2022), shared by ``FishrCallback`` and ``FishrMixin``.

    The defaults are DomainBed's ``Fishr``; every value is checked when the options are built, so a
    wrong one fails at construction, not at the first training step.

    Args:
        penalty_weight: λ once warm-up is over (DomainBed: 1000; random search ``10^U(1,4)``).
        warmup_steps: optimizer steps with λ = 0 (DomainBed: 1500; search ``int U(0, 5000)``). The EMA
            is updated during warm-up too.
        ema: decay γ of each domain's gradient-variance EMA, with DomainBed's ``1/(1-γ)`` correction
            (default 0.95; search ``U(0.90, 0.99)``); 0 disables it.
        backend: ``"closed_form"`` (default: exact, two matmuls per step, no per-sample gradient is
            materialised) or ``"backpack"`` (BackPACK ``BatchGrad``, the paper's route).
        num_domains: number of training domains. Default ``None``: ``max id + 1`` of the first batch
            of each fit (under DDP, the largest id over all ranks).
        penalty_ramp_steps: when > 0, λ grows linearly from 0 to ``penalty_weight`` over this many
            steps after warm-up instead of jumping (default 0, DomainBed's jump).
        reset_optimizer_at_warmup: clear the optimizers' state (Adam moments) at step
            ``warmup_steps`` as DomainBed re-creates Adam there (default ``True``).
        centered: centred gradient variance (default) or uncentred second moment (paper, Table 6).
        param_reduction: ``"mean"`` (default, DomainBed) or ``"sum"`` over head parameters.
        domain_reduction: ``"mean"`` (default, DomainBed) or ``"sum"`` over domains.
        loss: per-sample loss of the gradients: ``"cross_entropy"`` (default), ``"bce_with_logits"``
            (one-logit heads) or a callable ``(logits, targets) -> [N]`` of per-sample losses.
        covariance: ``"diagonal"`` (default, Fishr: the gradient variances) or ``"full"``: each domain's
            whole covariance matrix of the head's per-sample gradients (per weight/bias block, divided
            by the block's size), the paper's Table 6 ablation. Exact from ``N×N`` Gram matrices, never a
            ``P×P`` matrix, so affordable at DomainNet's head; needs ``ema=0`` and one process (see
            ``FishrPenalty`` and docs/lightning.md, "Full covariance").
    """

    penalty_weight: float = 1000.0
    warmup_steps: int = 1500
    ema: float = 0.95
    backend: Backend = "closed_form"
    num_domains: int | None = None
    penalty_ramp_steps: int = 0
    reset_optimizer_at_warmup: bool = True
    centered: bool = True
    param_reduction: Reduction = "mean"
    domain_reduction: Reduction = "mean"
    loss: LossName | PerSampleLoss = "cross_entropy"
    covariance: Covariance = "diagonal"

    def __post_init__(self) -> None:
        self.make_penalty()  # each raises FishrInputError with what to change
        self.make_schedule()

    @classmethod
    def check_names(cls, owner: str, options: Mapping[str, Any]) -> None:
        """Refuse a keyword that is not an option, in a sentence that lists the known ones (not a bare
        ``TypeError``). Callers then build ``FishrOptions(**options)`` themselves: written so,
        jsonargparse (LightningCLI) follows the ``**options`` to these fields and validates them."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise FishrInputError(
                f"{owner} got unknown Fishr option(s) {unknown}. The options are {names} (see FishrOptions); "
                "check the spelling."
            )

    def make_penalty(self, **extra: Any) -> FishrPenalty:
        """A fresh ``FishrPenalty`` with these options (``extra``: its other arguments, e.g. ``head_bias``)."""
        return FishrPenalty(
            num_domains=self.num_domains,
            ema=self.ema,
            centered=self.centered,
            param_reduction=self.param_reduction,
            domain_reduction=self.domain_reduction,
            loss=self.loss,
            backend=self.backend,
            covariance=self.covariance,
            **extra,
        )

    def make_schedule(self) -> FishrSchedule:
        """A fresh ``FishrSchedule``: λ = 0 during warm-up, then ``penalty_weight``."""
        return FishrSchedule(
            self.penalty_weight, self.warmup_steps, self.penalty_ramp_steps, self.reset_optimizer_at_warmup
        )
