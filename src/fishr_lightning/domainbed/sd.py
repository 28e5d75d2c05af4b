"""Spectral decoupling (Pezeshki et al., "Gradient Starvation", NeurIPS 2021, Eq. 25), DomainBed's ``SD``:
ERM's network and Adam, the objective ``CE + sd_reg · mean(logits²)`` over the batch of every domain
(``baselines.functional.spectral_decoupling_penalty``)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from fishr_lightning.baselines.functional import spectral_decoupling_penalty
from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.erm import ERM
from fishr_lightning.domainbed.minibatches import concatenate


class SD(ERM):
    """ERM's networks and ``optimizer``; ``sd_reg`` from the hyperparameters."""

    # ERM's DDP argument (means over equal shards) holds for the penalty too, but no test has run it under DDP.
    ddp_refusal = DomainBedAlgorithm.ddp_refusal
    quirks = ("the logged loss is the cross-entropy alone, without the penalty",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sd_reg = self.hparams["sd_reg"]

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x, all_y, _ = concatenate(minibatches)
        all_p = self.predict(all_x)
        loss = F.cross_entropy(all_p, all_y)
        penalty = spectral_decoupling_penalty(all_p)
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss + self.sd_reg * penalty)
        self.step("optimizer")
        return {"loss": loss.item(), "penalty": penalty.item()}
