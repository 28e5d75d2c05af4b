"""GroupDRO (Sagawa et al., "Distributionally Robust Neural Networks", ICLR 2020, Algorithm 1), DomainBed's
``GroupDRO``: ERM's network and Adam, the domains' weights ``q_e ← q_e · exp(η · R_e)`` normalised to sum to 1
(``baselines.functional.groupdro_update``), the objective ``Σ_e q_e R_e`` over the risks ``R_e`` of each
domain's minibatch (one forward per domain)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.baselines.functional import groupdro_objective, groupdro_update
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


class GroupDRO(ERM):
    """ERM's networks and ``optimizer``, plus DomainBed's ``q`` buffer: empty until the first update, then one
    weight per minibatch (in the state dict: a checkpoint or DomainBed's ``model_dict`` resizes it on load)."""

    ddp_refusal = "its weights q follow the risk of each domain's whole minibatch"
    quirks = (
        "the q buffer starts empty and is created (all ones) at the first update, one weight per minibatch",
        "q is never reset: it carries the exponentiated sum of every past risk",
        "one forward per domain (each normalised by its own BatchNorm statistics)",
        "the logged loss is the q-weighted risk",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("q", torch.Tensor())

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        losses_E = torch.stack([F.cross_entropy(self.predict(x), y) for x, y in minibatches])
        if not len(self.q):
            self.q = torch.ones(len(minibatches), dtype=losses_E.dtype, device=losses_E.device)
        self.q = groupdro_update(self.q, losses_E, self.hparams["groupdro_eta"])
        loss = groupdro_objective(self.q, losses_E)
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        return {"loss": loss.item()}

    def prepare_for_domainbed_state(self, model_dict: dict[str, Tensor]) -> None:
        """DomainBed's ``q`` after its first update has one entry per domain: resize ours to load it."""
        self._resize_q(model_dict.get("q"))

    def _resize_q(self, saved_q: Tensor | None) -> None:
        if saved_q is not None and saved_q.shape != self.q.shape:
            self.q = torch.empty(saved_q.shape, dtype=self.q.dtype, device=self.q.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Every load (Lightning's resume, the app's model.pt, load_state_dict): q as long as the saved one.
        self._resize_q(state_dict.get(f"{prefix}q"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
