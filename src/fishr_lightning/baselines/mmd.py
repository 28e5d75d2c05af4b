"""``MMDCallback``: MMD feature alignment (Li, Pan, Wang & Kot, CVPR 2018), as DomainBed's ``MMD.update``."""

from __future__ import annotations

import torch
from torch import Tensor

from fishr_lightning import distributed
from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback
from fishr_lightning.baselines.functional import mmd_penalty
from fishr_lightning.functional import FishrInputError
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import FishrSchedule


def gather_from_ranks(features_ND: Tensor, domains_N: Tensor) -> tuple[Tensor, Tensor]:
    """The global batch, ranks concatenated in order; the features differentiably (the gathered tensor's
    backward sums the gradient over ranks, and DDP's average then gives the single-process gradient)."""
    world_size = torch.distributed.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=domains_N.device) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([len(domains_N)], device=domains_N.device))
    if len({int(size) for size in sizes}) > 1:
        raise FishrInputError(
            f"MMDCallback under DDP gathers every rank's features, which needs equal batches on every rank; "
            f"they hold {[int(size) for size in sizes]} samples. Give each rank the same number of samples "
            "(drop_last=True, or a batch size divisible by the number of processes)."
        )
    domains = [torch.empty_like(domains_N) for _ in range(world_size)]
    torch.distributed.all_gather(domains, domains_N.contiguous())
    return distributed.differentiable_all_gather(features_ND), torch.cat(domains)


class MMDCallback(DomainPenaltyCallback):
    r"""Adds MMD's feature alignment, DomainBed's way: for every pair of training domains the (biased)
    maximum mean discrepancy of the head's input features under DomainBed's mixture of Gaussian
    kernels ``Σ_γ exp(−γ‖x − y‖²)``, ``γ ∈ {10⁻³, …, 10³}``, averaged over pairs and weighted by ``mmd_gamma``
    (0 with one training domain: ERM, as DomainBed).

    Args:
        mmd_gamma: the penalty's weight (DomainBed's name; default 1; search ``10^U(-1, 1)``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        num_domains: training domains; ``None`` infers them from the first batch.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: log prefix (default ``"mmd"``).

    As for CORAL, DomainBed's one forward per domain differs from one forward of the whole batch only
    through BatchNorm in training mode. The kernel is over pairs of samples, so its value is not a
    sum of per-rank statistics: under DDP every rank gathers the global batch's features (an
    ``N × D`` all-gather, an ``N × N`` kernel on every rank) and training equals one process on it.
    """

    name = "mmd"
    penalty_in_domainbed_loss = False  # DomainBed's update() returns the cross-entropy alone as `loss`

    def __init__(
        self,
        mmd_gamma: float = 1.0,
        head: str | None = None,
        num_domains: int | None = None,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
    ) -> None:
        schedule = FishrSchedule(mmd_gamma, 0, reset_optimizer=False)
        super().__init__(
            schedule=schedule, head=head, num_domains=num_domains, targets_and_domains=targets_and_domains, name=name
        )

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        E = self.domains_of(domains_N)
        if self.reduce is not None and E > 1:  # one domain: no pairs, nothing to gather (the same E on every rank)
            features_ND, domains_N = gather_from_ranks(features_ND, domains_N)
        return mmd_penalty(features_ND, domains_N, E)
