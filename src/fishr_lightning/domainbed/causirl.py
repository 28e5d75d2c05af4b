"""CausIRL (Chevalley et al. 2022, "Invariant causal mechanisms through distribution matching"), DomainBed's
``CausIRL_CORAL`` / ``CausIRL_MMD``: ERM plus ``mmd_gamma ·`` a distance between two halves of the batch, each
domain's features cut at a uniformly drawn index ``s_e ∈ [0, n_e)`` (rows before the cut to the first half,
the rest to the second): CORAL's ``mean((μ₁−μ₂)²) + mean((Σ₁−Σ₂)²)`` or MMD's Gaussian-kernel mixture. The
penalty is 0 when a half has one row or none, and ``nan_to_num``-ed, as DomainBed's."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.baselines.functional import coral_penalty, mmd_penalty
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


class AbstractCausIRL(ERM):
    """The cut of each domain's minibatch is drawn from ``self.random_state()`` (DomainBed: the global
    ``np.random.randint``), so it depends only on ``(seed, update)``; ``last_cuts`` keeps the update's."""

    gaussian: ClassVar[bool]
    ddp_refusal = (
        "its two halves cut every domain's whole minibatch at one drawn index, which a rank's shard does not hold"
    )
    quirks = ("the logits get + 1e-16 before the cross-entropy, as DomainBed's",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_cuts: list[int] = []

    def draw_cuts(self, sizes: list[int]) -> list[int]:
        """This update's cut of each domain's minibatch: DomainBed's ``np.random.randint(0, n_e)``, domain by domain."""
        random_state = self.random_state()
        return [int(random_state.randint(0, size)) for size in sizes]

    def distance(self, first: Tensor, second: Tensor) -> Tensor:
        features = torch.cat([first, second])
        halves = torch.cat([torch.zeros(len(first)), torch.ones(len(second))]).long().to(features.device)
        if self.gaussian:
            return mmd_penalty(features, halves, 2)
        return coral_penalty(features, halves, 2)

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        objective = sum(F.cross_entropy(self.classifier(z) + 1e-16, y) for z, (_, y) in zip(features, minibatches))
        objective = objective / len(minibatches)
        self.last_cuts = self.draw_cuts([len(z) for z in features])
        first = torch.cat([z[:cut] for z, cut in zip(features, self.last_cuts)])
        second = torch.cat([z[cut:] for z, cut in zip(features, self.last_cuts)])
        if len(first) > 1 and len(second) > 1:
            penalty = torch.nan_to_num(self.distance(first, second))
        else:
            penalty = torch.zeros((), dtype=objective.dtype, device=objective.device)
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(objective + self.hparams["mmd_gamma"] * penalty)
        self.step("optimizer")
        return {"loss": objective.item(), "penalty": penalty.item()}


class CausIRL_CORAL(AbstractCausIRL):  # noqa: N801 (DomainBed's name)
    """The two halves' distance is CORAL's: their means' and covariances' mean squared differences."""

    gaussian = False


class CausIRL_MMD(AbstractCausIRL):  # noqa: N801 (DomainBed's name)
    """The two halves' distance is MMD's, with DomainBed's mixture of Gaussian kernels."""

    gaussian = True
