"""``CORALCallback``: Deep CORAL (Sun & Saenko, ECCV 2016 workshops), as DomainBed's ``CORAL.update``."""

from __future__ import annotations

from torch import Tensor

from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback
from fishr_lightning.baselines.functional import coral_penalty
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import FishrSchedule


class CORALCallback(DomainPenaltyCallback):
    r"""Adds CORAL's feature alignment, DomainBed's way: for every pair of training domains,
    ``mean((μ_i − μ_j)²) + mean((Σ_i − Σ_j)²)`` on the head's input features (means, and covariances
    divided by ``n − 1``), averaged over the pairs and weighted by ``mmd_gamma``.

    Args:
        mmd_gamma: the penalty's weight (DomainBed's name; default 1; search ``10^U(-1, 1)``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        num_domains: training domains; ``None`` infers them from the first batch.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: log prefix (default ``"coral"``).

    With one training domain the penalty is 0 and training is ERM's, as DomainBed's (it averages over
    pairs only ``if nmb > 1``). DomainBed runs the featurizer once per domain: with BatchNorm in
    training mode each domain is normalised by its own statistics, which a module with one forward of
    the whole batch does not do (the app's module runs one forward per domain then). Under DDP the means and covariances are the
    global batch's (sums reduced over ranks).
    """

    name = "coral"
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
        return coral_penalty(features_ND, domains_N, self.domains_of(domains_N), self.reduce)
