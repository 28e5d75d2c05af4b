"""The app's LightningModule: DomainBed's ERM. Fishr is this same module plus ``FishrCallback``
(``configs/algorithm/fishr.yaml``): the module knows nothing of Fishr; IRM, V-REx, CORAL, MMD,
GroupDRO and SD likewise add their penalty through a callback of ``fishr_lightning.baselines``. Two
things a head callback cannot do live here (issue 21): Mixup, which changes the inputs, and one
forward per domain, which DomainBed's CORAL, MMD, GroupDRO and Mixup run (each domain normalised by
its own BatchNorm statistics). Evaluation, on DomainBed's schedule, is ``training/evaluation.py``'s
callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.app import AppError
from fishr_lightning.app.seeding import seed_hash
from fishr_lightning.baselines.functional import mixup_inputs, mixup_loss, random_domain_pairs
from fishr_lightning.head_penalty import HeadPenaltyCallback


class DomainClassifier(pl.LightningModule):
    """``featurizer → dropout → classifier``, trained with cross-entropy on batches ``(x, y, domain)``
    that hold one minibatch from each training domain.

    Args:
        featurizer: a module mapping inputs to ``[N, featurizer.n_outputs]`` features.
        num_classes: classes of the dataset.
        dropout: dropout on the features, before the head (DomainBed's ``resnet_dropout``).
        lr: Adam's learning rate (DomainBed's optimizer for ERM and Fishr).
        weight_decay: Adam's weight decay.
        per_domain_forward: one forward per training domain when the featurizer has BatchNorm in
            training mode (DomainBed's CORAL, MMD, GroupDRO and Mixup); otherwise, and by default, one
            forward of the whole batch, which gives the same numbers without BatchNorm statistics.
        mixup_alpha: when set, DomainBed's inter-domain Mixup: pairs of domains from a random
            permutation, inputs mixed by ``λ ~ Beta(α, α)``, the loss mixed likewise. Each step's
            permutation and ``λ``'s depend only on ``(mixup_seed, step)``, so a resumed run draws as the
            uninterrupted one.
        mixup_seed: seeds Mixup's draws.
    """

    def __init__(
        self,
        featurizer: nn.Module,
        num_classes: int,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_domain_forward: bool = False,
        mixup_alpha: float | None = None,
        mixup_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["featurizer"])
        self.featurizer = featurizer
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(featurizer.n_outputs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.featurizer(x)))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.get("mixup_alpha") is not None:
            # The head's rows are the pairs' mixed inputs, not the batch's samples (issue 25): a head
            # penalty would pair each logit with another sample's target and domain.
            penalties = [type(cb).__name__ for cb in self.trainer.callbacks if isinstance(cb, HeadPenaltyCallback)]
            if penalties:
                raise AppError(
                    f"Mixup (mixup_alpha={self.hparams.mixup_alpha}) cannot run with {', '.join(penalties)}: Mixup "
                    "feeds the head mixed inputs of pairs of training domains, whose rows are not the batch's samples, "
                    "so a head penalty would read other samples' targets and domains. Train Mixup alone (no penalty "
                    "callback in algorithm.callbacks or callbacks), or the penalty without mixup_alpha."
                )

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y_N, domain_N = batch
        if self.hparams.get("mixup_alpha") is not None:
            nll = self.mixup_loss(x, y_N, domain_N)
        elif self.forwards_per_domain():
            # The featurizer once per domain (its own BatchNorm statistics), the linear head once on the
            # features put back in batch order: the same logits as DomainBed's per-domain classifier
            # calls, and the one head forward per step that head callbacks capture.
            rows = domain_blocks(torch.arange(len(y_N), device=y_N.device), domain_N)
            features = torch.cat([self.featurizer(x[rows_n]) for rows_n in rows])
            features = features[torch.argsort(torch.cat(rows))]  # identity for the app's contiguous blocks
            nll = F.cross_entropy(self.classifier(self.dropout(features)), y_N)
        else:
            nll = F.cross_entropy(self(x), y_N)
        self.log("train/nll", nll, prog_bar=True, batch_size=len(y_N))
        return {"loss": nll, "nll": nll.detach()}

    def forwards_per_domain(self) -> bool:
        """One forward per domain: asked for, and a BatchNorm of the featurizer normalises with batch statistics."""
        return bool(self.hparams.get("per_domain_forward")) and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.featurizer.modules()
        )

    def mixup_loss(self, x: Tensor, y_N: Tensor, domain_N: Tensor) -> Tensor:
        """DomainBed's ``Mixup.update``: ``Σ_pairs [λ·CE(f(x̃), y_i) + (1−λ)·CE(f(x̃), y_j)] / E``."""
        domains = domain_blocks(torch.arange(len(y_N), device=y_N.device), domain_N)
        step = self.trainer.global_step if self._trainer is not None else 0
        seed = seed_hash(self.hparams.get("mixup_seed", 0), step)
        pairs = random_domain_pairs(len(domains), torch.Generator().manual_seed(seed))
        lams = np.random.RandomState(seed).beta(self.hparams.mixup_alpha, self.hparams.mixup_alpha, size=len(pairs))
        mixed = [mixup_inputs(x[domains[i]], x[domains[j]], float(lam)) for (i, j), lam in zip(pairs, lams)]
        if self.forwards_per_domain():
            logits = [self(x_mixed) for x_mixed, _ in mixed]
        else:  # one forward of every pair's mixed inputs: the same numbers without batch statistics
            logits = self(torch.cat([x_mixed for x_mixed, _ in mixed])).split([n for _, n in mixed])
        losses = [
            mixup_loss(logits_n, y_N[domains[i]][:n], y_N[domains[j]][:n], float(lam))
            for logits_n, ((i, j), lam), (_, n) in zip(logits, zip(pairs, lams), mixed)
        ]
        return torch.stack(losses).sum() / len(domains)

    def configure_optimizers(self) -> Any:
        # Called once the precision plugin has converted the module. Adam's eps (1e-8, DomainBed's) is 0 in
        # float16 (trainer.precision=16-true): a gradient whose square underflows gives 0/0, NaN weights after
        # the first step. There it is float16's smallest normal number instead (issue 18).
        dtype = next(self.parameters()).dtype
        eps = max(1e-8, torch.finfo(dtype).tiny) if dtype == torch.float16 else 1e-8
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, eps=eps)


def domain_blocks(tensor: Tensor, domain_N: Tensor) -> list[Tensor]:
    """``tensor``'s rows of each domain present, in order of domain id (DomainBed's minibatches; the
    app's batches hold one contiguous block per domain, so the blocks concatenated are the batch)."""
    return [tensor[domain_N == domain] for domain in torch.unique(domain_N).tolist()]
