"""``SDCallback``: spectral decoupling (Pezeshki et al., NeurIPS 2021, Eq. 25), as DomainBed's ``SD.update``."""

from __future__ import annotations

from typing import Any

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
        targets_and_domains: ignored by the penalty, which reads neither targets nor domain ids: any batch
            layout works (kept for the other callbacks' signature).
        name: log prefix (default ``"sd"``).

    Under DDP the mean is over the global batch (the sum and count reduced over ranks).
    """

    name = "sd"
    penalty_in_domainbed_loss = False  # DomainBed's update() returns the cross-entropy alone as `loss`
    uses_domain_ids = False  # SD's penalty is over the logits alone (issue 25: no domain ids demanded)

    def __init__(
        self,
        sd_reg: float = 0.1,
        head: str | None = None,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
    ) -> None:
        schedule = FishrSchedule(sd_reg, 0, reset_optimizer=False)
        super().__init__(
            schedule=schedule, head=head, targets_and_domains=targets_and_domains or nothing_from_batch, name=name
        )

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        return spectral_decoupling_penalty(logits_NC, self.reduce)


def nothing_from_batch(batch: Any) -> tuple[None, None]:
    """SD's batch reader: its penalty needs neither targets nor domain ids, so any layout (``(x, y)``) works."""
    return None, None
