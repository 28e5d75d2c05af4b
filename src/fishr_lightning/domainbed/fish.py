"""Fish (Shi et al., "Gradient Matching for Domain Generalization", ICLR 2022), DomainBed's ``Fish``.

Each update clones the network (``network_inner``), takes one Adam step per training domain on the
clone, domain after domain, and moves the network towards the clone (Reptile's first-order step,
Shi et al.'s Algorithm 1)::

    θ̃ ← θ;  for e = 1..E: θ̃ ← Adam(θ̃, ∇ L_e(θ̃));   θ ← θ + meta_lr · (θ̃ − θ)

which matches the domains' gradients to first order (the inner steps' inner products ``G_e · G_e'``
appear in the expansion of ``θ̃ − θ``). ``meta_lr`` is DomainBed's ``hparams["meta_lr"]``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, DomainBedError, Minibatches
from fishr_lightning.domainbed.networks import Classifier, adam

INNER = "network_inner."


class WholeFish(nn.Module):
    """DomainBed's ``networks.WholeFish``: ``net = Sequential(featurizer, classifier)`` (keys ``net.0.*``,
    ``net.1.*``)."""

    def __init__(self, featurizer: nn.Module, num_classes: int, nonlinear_classifier: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(featurizer, Classifier(featurizer.n_outputs, num_classes, nonlinear_classifier))

    def reset_weights(self, weights: dict[str, Tensor]) -> None:
        self.load_state_dict(copy.deepcopy(weights))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Fish(DomainBedAlgorithm):
    """DomainBed's Fish: ``network = WholeFish`` with DomainBed's keys (``network.net.0.*``, ``network.net.1.*``; after the first
    update also ``network_inner.net.*``, the clone), Adam ``optimizer`` on it (built, never stepped: DomainBed's
    update moves the network by ``load_state_dict``), the clone's Adam state carried from update to update."""

    ddp_refusal = (
        "its inner loop steps a clone of the network once per domain on that domain's minibatch, outside DDP's "
        "gradient averaging, and moves the network by a state-dict interpolation DDP does not see"
    )
    quirks = (
        "the state dict gains `network_inner.*` (the clone of the last update) after the first update",
        "the clone's Adam state (`optimizer_inner`) is carried from one update to the next, with the network's "
        "weights at each update's start but the moments of all the earlier inner steps (saved in the checkpoint)",
        "the meta step interpolates the whole state dict, buffers included (BatchNorm statistics; integer buffers "
        "such as `num_batches_tracked` truncated back to integers)",
        "`optimizer` (Adam on the network) is built but never stepped: its state stays empty",
        "the logged `loss` is the last domain's inner cross-entropy",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network = WholeFish(self.make_featurizer(), self.num_classes, self.hparams["nonlinear_classifier"])
        # DomainBed's optimizer_inner_state: the clone's Adam state_dict after the last update (None before).
        self.optimizer_inner_state: dict[str, Any] | None = None

    @property
    def featurizer(self) -> nn.Module:
        return self.network.net[0]

    @property
    def classifier(self) -> nn.Module:
        return self.network.net[1]

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": adam(self.network.parameters(), self.hparams)}

    def create_clone(self) -> None:
        """DomainBed's ``create_clone``: ``network_inner`` with the network's weights and a fresh Adam that
        loads the previous update's inner state. The clone is built once (a copy of the network, not a second
        call of the featurizer factory: no pretrained weights reloaded, no global random numbers drawn) and
        reloaded with the network's weights at every update: the same module DomainBed rebuilds."""
        if "network_inner" not in self._modules:
            self.network_inner = copy.deepcopy(self.network)
        self.network_inner.reset_weights(self.network.state_dict())
        self.optimizer_inner = adam(self.network_inner.parameters(), self.hparams)
        if self.optimizer_inner_state is not None:
            self.optimizer_inner.load_state_dict(self.optimizer_inner_state)

    @staticmethod
    def fish(meta_weights: dict[str, Tensor], inner_weights: dict[str, Tensor], lr_meta: float) -> dict[str, Tensor]:
        """``θ + lr_meta · (θ̃ − θ)`` over the whole state dict (DomainBed's ``ParamDict`` arithmetic)."""
        return {key: meta_weights[key] + lr_meta * (inner_weights[key] - meta_weights[key]) for key in meta_weights}

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        self.create_clone()
        for x, y in minibatches:
            loss = F.cross_entropy(self.network_inner(x), y)
            self.optimizer_inner.zero_grad()
            self.manual_backward(loss)
            self.optimizer_inner.step()
        self.optimizer_inner_state = self.optimizer_inner.state_dict()
        meta_weights = self.fish(self.network.state_dict(), self.network_inner.state_dict(), self.hparams["meta_lr"])
        self.network.reset_weights(meta_weights)
        # DomainBed never steps its `optimizer`; this step of it counts the update in Lightning (one update, one
        # step of the run) and changes nothing: no parameter of the network has a gradient, Adam skips them all.
        self.optimizer_named("optimizer").zero_grad()
        self.step("optimizer")
        return {"loss": loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.precision == "16-mixed":
            raise DomainBedError(
                "Fish steps its inner Adam on gradients of the domains' losses, which trainer.precision=16-mixed's "
                "gradient scaler would leave scaled; train it with 32-true, bf16-mixed or bf16-true."
            )

    # --- the lazily created clone and its optimizer's state -----------------------------------------------
    def prepare_for_domainbed_state(self, model_dict: dict[str, Tensor]) -> None:
        if any(key.startswith(INNER) for key in model_dict) and "network_inner" not in self._modules:
            self.network_inner = copy.deepcopy(self.network)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # A trained Fish's state (a checkpoint, model.pt, DomainBed's model_dict) has network_inner.*: make it.
        self.prepare_for_domainbed_state(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resume exact: the inner Adam's moments are state DomainBed keeps between updates (issue 26).
        checkpoint["fish_optimizer_inner_state"] = self.optimizer_inner_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer_inner_state = checkpoint.get("fish_optimizer_inner_state")
