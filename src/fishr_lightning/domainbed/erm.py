"""ERM (Vapnik 1998), DomainBed's ``ERM``: the mean cross-entropy of every training domain's minibatch
together, one Adam step. The base of the algorithms that change only its loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import Classifier, adam


class ERM(DomainBedAlgorithm):
    """``featurizer → classifier``, ``network = Sequential(featurizer, classifier)`` (DomainBed's keys:
    ``featurizer.*``, ``classifier.*`` and their aliases ``network.0.*``, ``network.1.*``), Adam."""

    ddp_refusal = None  # the mean cross-entropy of equal shards: DDP's averaged gradient is one process's

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.featurizer = self.make_featurizer()
        self.classifier = Classifier(self.featurizer.n_outputs, self.num_classes, self.hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": adam(self.network.parameters(), self.hparams)}

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(all_x), all_y)
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        return {"loss": loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)
