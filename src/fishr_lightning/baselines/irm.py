"""``IRMCallback``: Invariant Risk Minimization (Arjovsky, Bottou, Gulrajani & Lopez-Paz, 2019), as
DomainBed's ``IRM.update``."""

from __future__ import annotations

import torch
from torch import Tensor

from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback, ranks_before
from fishr_lightning.baselines.functional import domain_counts, irm_penalty
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import FishrSchedule


class IRMCallback(DomainPenaltyCallback):
    r"""Adds IRMv1's penalty, DomainBed's way, to the loss of any LightningModule.

    Per domain, DomainBed splits the domain's samples into even- and odd-indexed halves and takes
    the product of the gradients of their mean cross-entropies with respect to a dummy scale on the
    logits (an unbiased estimate of the squared gradient); the penalty is the mean over domains.
    DomainBed's objective is ``mean_e CE_e + w · penalty`` with ``w = 1.0`` (not 0) for steps
    ``< irm_penalty_anneal_iters``, then ``irm_lambda``, and Adam re-created at the annealing step.

    Args:
        irm_lambda: the penalty's weight after annealing (DomainBed: 100; search ``10^U(-1, 5)``).
        irm_penalty_anneal_iters: optimizer steps weighted 1.0 (DomainBed: 500; search ``int 10^U(0, 4)``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        num_domains: training domains; ``None`` infers them from the first batch.
        reset_optimizer_at_anneal: clear the optimizers' state at step ``irm_penalty_anneal_iters``
            as DomainBed re-creates Adam there (default ``True``).
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: log prefix (default ``"irm"``: ``irm/penalty``, ``irm/weight``).

    The module's loss stands for DomainBed's ``mean_e CE_e``: the mean cross-entropy over a batch
    with the same number of samples per domain (DomainBed's batches) is exactly that. Under DDP the
    halves are the global batch's (each domain's samples concatenated rank after rank) and the
    per-domain sums are reduced over ranks: training equals one process on the whole batch.
    """

    name = "irm"
    warmup_option = "irm_penalty_anneal_iters"  # named in the warning when the fit ends before it (issue 30)
    needs_class_logits = True  # DomainBed's cross-entropy: a one-logit BCE head is refused

    def __init__(
        self,
        irm_lambda: float = 1e2,
        irm_penalty_anneal_iters: int = 500,
        head: str | None = None,
        num_domains: int | None = None,
        reset_optimizer_at_anneal: bool = True,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
    ) -> None:
        schedule = FishrSchedule(
            irm_lambda, irm_penalty_anneal_iters, reset_optimizer=reset_optimizer_at_anneal, weight_before=1.0
        )
        super().__init__(
            schedule=schedule, head=head, num_domains=num_domains, targets_and_domains=targets_and_domains, name=name
        )

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        E = self.domains_of(domains_N)
        offset_E = None
        if self.reduce is not None:  # where this rank's samples of each domain sit in the global batch
            offset_E = ranks_before(domain_counts(domains_N, E, torch.float64))
        return irm_penalty(logits_NC, targets_N, domains_N, E, self.reduce, offset_E)
