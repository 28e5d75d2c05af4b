"""Fishr in your own training loop, with Lightning Fabric (or none): `FishrPenalty` and `FishrSchedule`.

The loop below is all `FishrCallback` does for a Trainer: λ_t from the step, the optimizer reset
when the penalty switches on, and `λ_t · P` added to the loss before the one backward. Under DDP
(`Fabric(strategy="ddp", devices=2)`) the per-domain moments are all-reduced, so each domain's
variance is over the global batch. Runs on CPU in seconds:  python examples/fabric_loop.py
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning import FishrPenalty, FishrSchedule
from fishr_lightning.distributed import distributed_max, distributed_reduction


class FeaturesAndLogits(nn.Module):
    """Returns the head's input and output: what Fishr needs from the forward."""

    def __init__(self, featurizer: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.featurizer, self.classifier = featurizer, classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.featurizer(x)
        return features, self.classifier(features)


def train(
    fabric: Fabric,
    model: FeaturesAndLogits,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    penalty: FishrPenalty,
    schedule: FishrSchedule,
    max_steps: int,
) -> None:
    """DomainBed's Fishr update, one optimizer step per ``(x, y, domain)`` batch."""
    penalty.reduce_moments = distributed_reduction(fabric.world_size)
    penalty.reduce_max = distributed_max(fabric.world_size)
    head = model.classifier
    step = 0
    while step < max_steps:
        for x, y, domains in batches:
            if step == max_steps:
                break
            schedule.maybe_reset(step, [optimizer])
            weight = schedule.weight(step)
            features, logits = model(x)
            fishr = penalty.penalty_for_weight(weight, features, logits, y, domains, head=head)
            loss = F.cross_entropy(logits, y) + weight * fishr
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            step += 1


def main() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    g = torch.Generator().manual_seed(0)
    n, num_domains = 3 * 512, 3
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)
    x[:, 0] += 2 * y - 1
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, y, torch.arange(n) % num_domains), batch_size=96))
    model = FeaturesAndLogits(nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    penalty = FishrPenalty(ema=0.95)
    train(fabric, model, optimizer, loader, penalty, FishrSchedule(penalty_weight=100.0, warmup_steps=20), max_steps=60)
    print(f"trained {penalty.num_updates} steps over {penalty.num_domains} domains")


if __name__ == "__main__":
    main()
