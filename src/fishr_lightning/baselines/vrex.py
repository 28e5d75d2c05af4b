"""``VRExCallback``: Variance Risk Extrapolation (Krueger et al., ICML 2021), as DomainBed's ``VREx.update``."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback
from fishr_lightning.baselines.functional import domain_losses_ema, domain_mean_losses, vrex_penalty
from fishr_lightning.functional import FishrInputError
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import FishrSchedule


class VRExCallback(DomainPenaltyCallback):
    r"""Adds V-REx's penalty, the variance of the training domains' mean losses, DomainBed's way.

    Penalty ``mean_e (L_e − mean L)²`` over each domain's mean cross-entropy ``L_e``; DomainBed's
    objective is ``mean_e L_e + w · penalty`` with ``w = 1.0`` (not 0) for steps
    ``< vrex_penalty_anneal_iters``, then ``vrex_lambda``, and Adam re-created at the annealing step.

    Args:
        vrex_lambda: the penalty's weight after annealing (DomainBed: 10; search ``10^U(-1, 5)``).
        vrex_penalty_anneal_iters: optimizer steps weighted 1.0 (DomainBed: 500; search ``int 10^U(0, 4)``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        num_domains: training domains; ``None`` infers them from the first batch.
        reset_optimizer_at_anneal: clear the optimizers' state at step ``vrex_penalty_anneal_iters``
            as DomainBed re-creates Adam there (default ``True``).
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: log prefix (default ``"vrex"``).
        ema: the Fishr paper's ablation "V-REx with EMA" (Rame et al., ICML 2022, Tables 9-10): the
            variance is taken over an exponential moving average of the domain risks, Fishr's own
            (``m_e ← ema·m_e + (1-ema)·L_e``, the penalty over ``m_e / (1-ema)``, the gradient through
            this step's ``L_e`` only), carried across steps and saved in checkpoints. Default ``0``:
            no average, DomainBed's V-REx; in ``[0, 1)``.

    The module's loss stands for ``mean_e L_e`` (equal per-domain counts, DomainBed's batches). Under
    DDP each ``L_e`` is the global batch's (per-domain sums reduced over ranks), so every rank holds the
    same moving average with ``ema``.
    """

    name = "vrex"
    warmup_option = "vrex_penalty_anneal_iters"  # named in the warning when the fit ends before it (issue 30)
    needs_class_logits = True  # DomainBed's cross-entropy: a one-logit BCE head is refused

    def __init__(
        self,
        vrex_lambda: float = 1e1,
        vrex_penalty_anneal_iters: int = 500,
        head: str | None = None,
        num_domains: int | None = None,
        reset_optimizer_at_anneal: bool = True,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
        ema: float = 0.0,
    ) -> None:
        if isinstance(ema, bool) or not isinstance(ema, int | float) or not (0.0 <= ema < 1.0) or math.isnan(ema):
            raise FishrInputError(
                f"VRExCallback: ema={ema!r}; the decay of the domain risks' moving average is a number in [0, 1): "
                "0 (the default) is DomainBed's V-REx, e.g. 0.95 averages over about 20 steps (the Fishr paper's "
                "'V-REx with EMA')."
            )
        schedule = FishrSchedule(
            vrex_lambda, vrex_penalty_anneal_iters, reset_optimizer=reset_optimizer_at_anneal, weight_before=1.0
        )
        super().__init__(
            schedule=schedule, head=head, num_domains=num_domains, targets_and_domains=targets_and_domains, name=name
        )
        self.ema = float(ema)
        # The moving average of the domain risks (detached, [E]) with ema > 0; all ranks hold the same one.
        self.risk_average: Tensor | None = None

    def reset_state(self) -> None:
        super().reset_state()
        self.risk_average = None

    def _accumulation_note(self) -> str:
        return ", and the risks' moving average takes one step per micro-batch" if self.ema > 0 else ""

    def state_dict(self) -> dict[str, Any]:
        average = None if self.risk_average is None else self.risk_average.detach().cpu()
        return {**super().state_dict(), "risk_average": average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.risk_average = state_dict.get("risk_average")

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        E = self.domains_of(domains_N)
        loss_N = F.cross_entropy(logits_NC, targets_N, reduction="none")
        losses_E = domain_mean_losses(loss_N, domains_N, E, self.reduce)
        if self.ema > 0:  # issue 26: the paper's "V-REx with EMA"; ema=0 keeps DomainBed's V-REx op for op
            self.risk_average, losses_E = domain_losses_ema(self.risk_average, losses_E, self.ema)
        return vrex_penalty(losses_E)
