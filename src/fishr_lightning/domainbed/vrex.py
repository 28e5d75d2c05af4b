"""V-REx (Krueger et al., "Out-of-Distribution Generalization via Risk Extrapolation", ICML 2021),
DomainBed's ``VREx``: ERM's network and Adam, the objective ``mean_e R_e + λ_t · mean_e (R_e − mean R)²`` over
the domains' mean cross-entropies ``R_e`` (``baselines.functional.vrex_penalty``), ``λ_t = 1`` before
``vrex_penalty_anneal_iters`` updates and ``vrex_lambda`` from then on, Adam re-created at the switch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fishr_lightning.baselines.functional import domain_mean_losses, vrex_penalty
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM
from fishr_lightning.domainbed.minibatches import concatenate


class VREx(ERM):
    """ERM's networks and ``optimizer``, plus DomainBed's ``update_count`` buffer, which schedules the penalty."""

    ddp_refusal = "its penalty is the variance of the risks of each domain's whole minibatch"
    quirks = (
        "penalty weight 1.0 (not 0) before vrex_penalty_anneal_iters updates, vrex_lambda after",
        "Adam re-created (its state forgotten) at update vrex_penalty_anneal_iters, also when it is 0",
        "the logged nll is the last domain's risk, not their mean",
        "update_count buffer in the state dict",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        anneal_iters = self.hparams["vrex_penalty_anneal_iters"]
        penalty_weight = self.hparams["vrex_lambda"] if self.update_count >= anneal_iters else 1.0
        all_x, all_y, domain_N = concatenate(minibatches)
        all_logits = self.network(all_x)
        losses_E = domain_mean_losses(F.cross_entropy(all_logits, all_y, reduction="none"), domain_N, len(minibatches))
        mean = losses_E.mean()
        penalty = vrex_penalty(losses_E)
        loss = mean + penalty_weight * penalty
        if self.update_count == anneal_iters:  # DomainBed: "Reset Adam (like IRM)"
            self.reset_optimizer("optimizer")
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        self.update_count += 1
        # DomainBed's `nll` is the loop variable: the last domain's risk.
        return {"loss": loss.item(), "nll": losses_E[-1].item(), "penalty": penalty.item()}
