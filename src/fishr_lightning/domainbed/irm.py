"""IRM (Arjovsky et al., "Invariant Risk Minimization", 2019), DomainBed's ``IRM``: ERM's network and Adam,
the objective ``mean_e CE_e + λ_t · mean_e ∇_s CE(s·f(x_e^even)) · ∇_s CE(s·f(x_e^odd))`` at the dummy scale
``s = 1`` (``baselines.functional.irm_penalty``, its closed form), ``λ_t = 1`` before
``irm_penalty_anneal_iters`` updates and ``irm_lambda`` from then on, Adam re-created at the switch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fishr_lightning.baselines.functional import domain_mean_losses, irm_penalty
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM
from fishr_lightning.domainbed.minibatches import concatenate


class IRM(ERM):
    """ERM's ``featurizer``/``classifier``/``network`` and ``optimizer``, plus DomainBed's ``update_count``
    buffer (the updates done, in the state dict), which schedules the penalty."""

    ddp_refusal = "its penalty pairs the even- and odd-indexed samples of each domain's whole minibatch"
    quirks = (
        "penalty weight 1.0 (not 0) before irm_penalty_anneal_iters updates, irm_lambda after",
        "Adam re-created (its state forgotten) at update irm_penalty_anneal_iters, also when it is 0",
        "the penalty of a domain: the product of the dummy-scale gradients of its even- and odd-indexed samples",
        "update_count buffer in the state dict",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        anneal_iters = self.hparams["irm_penalty_anneal_iters"]
        penalty_weight = self.hparams["irm_lambda"] if self.update_count >= anneal_iters else 1.0
        all_x, all_y, domain_N = concatenate(minibatches)
        all_logits = self.network(all_x)
        num_domains = len(minibatches)
        nll = domain_mean_losses(F.cross_entropy(all_logits, all_y, reduction="none"), domain_N, num_domains).mean()
        penalty = irm_penalty(all_logits, all_y, domain_N, num_domains)
        loss = nll + penalty_weight * penalty
        if self.update_count == anneal_iters:  # DomainBed: "Reset Adam, because it doesn't like the sharp jump"
            self.reset_optimizer("optimizer")
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        self.update_count += 1
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}
