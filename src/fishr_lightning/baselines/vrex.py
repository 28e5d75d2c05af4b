"""``VRExCallback``: Variance Risk Extrapolation (Krueger et al., ICML 2021), as DomainBed's ``VREx.update``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback
from fishr_lightning.baselines.functional import domain_mean_losses, vrex_penalty
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

    The module's loss stands for ``mean_e L_e`` (equal per-domain counts, DomainBed's batches). Under
    DDP each ``L_e`` is the global batch's (per-domain sums reduced over ranks).
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
    ) -> None:
        schedule = FishrSchedule(
            vrex_lambda, vrex_penalty_anneal_iters, reset_optimizer=reset_optimizer_at_anneal, weight_before=1.0
        )
        super().__init__(
            schedule=schedule, head=head, num_domains=num_domains, targets_and_domains=targets_and_domains, name=name
        )

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        E = self.domains_of(domains_N)
        loss_N = F.cross_entropy(logits_NC, targets_N, reduction="none")
        return vrex_penalty(domain_mean_losses(loss_N, domains_N, E, self.reduce))
