"""Transfer (Zhang et al., NeurIPS 2021, "Quantifying and improving transferability in domain generalization",
Algorithm 1), DomainBed's ``Transfer``: an adversarial copy ``h'`` of the classifier ``h``, kept in the ball
``‖h' − h‖ ≤ delta`` (Euclidean over all its parameters), looks for the largest gap between the domains'
risks, which the featurizer then closes. One update:

1. ``optimizer`` steps on the cross-entropy of all domains, ``CE(h(f(x)), y)``;
2. ``optimizer`` steps on ``t_lambda · (max_e − min_e) CE(h'(f(x_e)), y_e)`` (the gap under ``h'``);
3. ``h' ← h``, then ``d_steps_per_g`` times: ``adv_opt`` (SGD, ``lr_d``) ascends the gap in ``h'``,
   and ``h'`` is projected back onto the ball: ``h' ← h + delta/‖h' − h‖ · (h' − h)`` when outside.

``optimizer`` is Adam (``lr``, ``weight_decay``) on the featurizer and classifier, or with ``gda`` SGD (``lr``) on
the adversarial classifier's parameters, as DomainBed's ``__init__`` builds it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import Classifier, adam


def distance(h1: nn.Module, h2: nn.Module) -> Tensor:
    """DomainBed's ``misc.distance``: the Euclidean norm of the difference of two classifiers' state dicts."""
    state_1, state_2 = h1.state_dict(), h2.state_dict()
    return torch.sqrt(sum(torch.norm(state_1[name] - state_2[name]) ** 2 for name in state_1))


@torch.no_grad()
def project(delta: float, adv_h: nn.Module, h: nn.Module) -> None:
    """DomainBed's ``misc.proj``: ``adv_h`` moved onto the ball of radius ``delta`` around ``h`` if outside."""
    dist = distance(adv_h, h)
    if dist <= delta:
        return
    ratio = delta / dist
    for param_h, param_adv_h in zip(h.parameters(), adv_h.parameters()):
        param_adv_h.data = param_h + ratio * (param_adv_h - param_h)


class Transfer(DomainBedAlgorithm):
    """``featurizer``, ``classifier``, ``adv_classifier`` (DomainBed's ``networks.Classifier``, a copy of the
    classifier at start) and the ``update_count`` buffer: DomainBed's keys."""

    ddp_refusal = (
        "its gap is the largest minus the smallest of the domains' losses, each over its domain's whole minibatch, "
        "which a rank's shard does not hold"
    )
    quirks = (
        "with gda (DomainBed's registry sets it in every random draw) 'optimizer' is SGD on the adversarial "
        "classifier's parameters: the featurizer and classifier are never updated, only the adversary moves",
        "optimizer steps twice per update (the cross-entropy, then the gap)",
        "weight_decay_d and beta1 are in the registry but unused; update_count is a buffer that update never changes",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))
        self.d_steps_per_g = self.hparams["d_steps_per_g"]
        self.featurizer = self.make_featurizer()
        nonlinear = self.hparams["nonlinear_classifier"]
        self.classifier = Classifier(self.featurizer.n_outputs, self.num_classes, nonlinear)
        self.adv_classifier = Classifier(self.featurizer.n_outputs, self.num_classes, nonlinear)
        self.adv_classifier.load_state_dict(self.classifier.state_dict())

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.hparams["gda"]:
            optimizer = torch.optim.SGD(self.adv_classifier.parameters(), lr=self.hparams["lr"])
        else:
            optimizer = adam([*self.featurizer.parameters(), *self.classifier.parameters()], self.hparams)
        adv_opt = torch.optim.SGD(self.adv_classifier.parameters(), lr=self.hparams["lr_d"])
        return {"optimizer": optimizer, "adv_opt": adv_opt}

    def loss_gap(self, minibatches: Minibatches) -> Tensor:
        """DomainBed's ``loss_gap``: ``max_e − min_e`` of the domains' cross-entropies under the adversary."""
        max_env_loss = min_env_loss = None
        for x, y in minibatches:
            loss = F.cross_entropy(self.adv_classifier(self.featurizer(x)), y)
            if max_env_loss is None or loss > max_env_loss:
                max_env_loss = loss
            if min_env_loss is None or loss < min_env_loss:
                min_env_loss = loss
        return max_env_loss - min_env_loss

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        optimizer, adv_opt = self.optimizer_named("optimizer"), self.optimizer_named("adv_opt")
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(all_x), all_y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        gap = self.hparams["t_lambda"] * self.loss_gap(minibatches)
        optimizer.zero_grad()
        self.manual_backward(gap)
        self.step("optimizer")
        self.adv_classifier.load_state_dict(self.classifier.state_dict())
        for _ in range(self.d_steps_per_g):
            adv_opt.zero_grad()
            gap = -self.hparams["t_lambda"] * self.loss_gap(minibatches)
            self.manual_backward(gap)
            self.step("adv_opt")
            project(self.hparams["delta"], self.adv_classifier, self.classifier)
        return {"loss": loss.item(), "gap": -gap.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))
