"""``SDCallback``: spectral decoupling (Pezeshki et al., NeurIPS 2021, Eq. 25), as DomainBed's ``SD.update``."""

from __future__ import annotations

from torch import Tensor

from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback
from fishr_lightning.baselines.functional import spectral_decoupling_penalty
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import FishrSchedule


class SDCallback(DomainPenaltyCallback):
    r"""Adds spectral decoupling, ``sd_reg · mean(logits²)`` over every logit of the batch (DomainBed's SD).

    Args:
        sd_reg: the penalty's weight (DomainBed: 0.1; search ``10^U(-5, -1)``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts (SD reads no
            domain id, but the batch is read the same way as the other penalties').
        name: log prefix (default ``"sd"``).

    Under DDP the mean is over the global batch (the sum and count reduced over ranks).
    """

    name = "sd"

    def __init__(
        self,
        sd_reg: float = 0.1,
        head: str | None = None,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
    ) -> None:
        schedule = FishrSchedule(sd_reg, 0, reset_optimizer=False)
        super().__init__(schedule=schedule, head=head, targets_and_domains=targets_and_domains, name=name)

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        return spectral_decoupling_penalty(logits_NC, self.reduce)
