"""The app's LightningModule: DomainBed's ERM. Fishr is this same module plus ``FishrCallback``
(``configs/algorithm/fishr.yaml``): the module knows nothing of Fishr. Evaluation, on DomainBed's
schedule, is ``training/evaluation.py``'s callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DomainClassifier(pl.LightningModule):
    """``featurizer → dropout → classifier``, trained with cross-entropy on batches ``(x, y, domain)``
    that hold one minibatch from each training domain.

    Args:
        featurizer: a module mapping inputs to ``[N, featurizer.n_outputs]`` features.
        num_classes: classes of the dataset.
        dropout: dropout on the features, before the head (DomainBed's ``resnet_dropout``).
        lr: Adam's learning rate (DomainBed's optimizer for ERM and Fishr).
        weight_decay: Adam's weight decay.
    """

    def __init__(
        self,
        featurizer: nn.Module,
        num_classes: int,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["featurizer"])
        self.featurizer = featurizer
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(featurizer.n_outputs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.featurizer(x)))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y_N, _domain_N = batch
        nll = F.cross_entropy(self(x), y_N)
        self.log("train/nll", nll, prog_bar=True, batch_size=len(y_N))
        return {"loss": nll, "nll": nll.detach()}

    def configure_optimizers(self) -> Any:
        # Called once the precision plugin has converted the module. Adam's eps (1e-8, DomainBed's) is 0 in
        # float16 (trainer.precision=16-true): a gradient whose square underflows gives 0/0, NaN weights after
        # the first step. There it is float16's smallest normal number instead (issue 18).
        dtype = next(self.parameters()).dtype
        eps = max(1e-8, torch.finfo(dtype).tiny) if dtype == torch.float16 else 1e-8
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, eps=eps)
