"""``GroupDROCallback``: Group DRO (Sagawa, Koh, Hashimoto & Liang, ICLR 2020, Algorithm 1), as
DomainBed's ``GroupDRO.update``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.baselines.domain_penalty import DomainPenaltyCallback
from fishr_lightning.baselines.functional import domain_mean_losses, groupdro_objective, groupdro_update
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import FishrSchedule


class GroupDROCallback(DomainPenaltyCallback):
    r"""Replaces the mean over domains of the domains' losses by GroupDRO's weighted one, DomainBed's way.

    Each step, with ``L_e`` each domain's mean cross-entropy: ``q_e ← q_e · exp(η · L_e)``, then
    ``q ← q / Σq`` (``q`` starts at ones, so after the first step at ``softmax(η L)``), and DomainBed's
    loss is ``Σ_e q_e L_e``. ``q`` is carried across steps and saved in checkpoints.

    The module's loss stands for ``mean_e L_e`` (the mean cross-entropy of a batch with equal counts
    per domain, DomainBed's batches), so the callback adds ``Σ_e (q_e − 1/E) L_e``: the loss becomes
    ``Σ_e q_e L_e`` and any other term of the module's loss (or of another penalty callback) stays.
    It logs ``groupdro/penalty`` = ``Σ_e q_e L_e``, the loss DomainBed's ``update`` returns.

    Args:
        groupdro_eta: the step size ``η`` of ``q``'s exponentiated-gradient update (DomainBed: 0.01;
            search ``10^U(-3, -1)``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        num_domains: training domains; ``None`` infers them from the first batch.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: log prefix (default ``"groupdro"``).

    DomainBed runs one forward per domain; it differs from one forward of the whole batch only
    through BatchNorm in training mode (the app's module runs one forward per domain then). Under
    DDP each ``L_e`` is the global batch's (per-domain sums reduced over ranks), so every rank holds
    the same ``q``.
    """

    name = "groupdro"
    needs_class_logits = True  # DomainBed's cross-entropy: a one-logit BCE head is refused

    def __init__(
        self,
        groupdro_eta: float = 1e-2,
        head: str | None = None,
        num_domains: int | None = None,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            schedule=FishrSchedule(1.0, 0, reset_optimizer=False),
            head=head,
            num_domains=num_domains,
            targets_and_domains=targets_and_domains,
            name=name,
        )
        self.groupdro_eta = groupdro_eta
        self.q: Tensor | None = None
        self._domain_losses_E: Tensor | None = None

    @property
    def last_penalty(self) -> float | None:
        """``None``: GroupDRO has no penalty; its robust loss (logged as ``groupdro/penalty``) replaces the
        loss, and DomainBed's GroupDRO records only ``loss``, so a record gets no ``penalty`` from it."""
        return None

    def reset_state(self) -> None:
        super().reset_state()
        self.q = None

    def _accumulation_note(self) -> str:
        return ", and q takes one exponentiated-gradient step per micro-batch (accumulate_grad_batches per step)"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "q": None if self.q is None else self.q.detach().cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.q = state_dict.get("q")

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        E = self.domains_of(domains_N)
        loss_N = F.cross_entropy(logits_NC, targets_N, reduction="none")
        losses_E = domain_mean_losses(loss_N, domains_N, E, self.reduce)
        if self.q is None:
            self.q = torch.ones(E, dtype=losses_E.dtype, device=losses_E.device)
        self.q = groupdro_update(self.q.to(losses_E.device, losses_E.dtype), losses_E, self.groupdro_eta)
        self._domain_losses_E = losses_E
        return groupdro_objective(self.q, losses_E)

    def combine(self, loss: Tensor, penalty: Tensor, weight: float) -> Tensor:
        """``loss + Σ_e q_e L_e − mean_e L_e``: the robust loss in place of the domains' plain mean."""
        losses_E, self._domain_losses_E = self._domain_losses_E, None
        return loss + (penalty - losses_E.mean()).to(loss.dtype)
