"""Fishr on your own LightningModule: add `FishrCallback` to the Trainer, change nothing else.

Three training domains of generated data in which a spurious feature agrees with the label
in a share of samples that differs per domain; a fourth domain, never trained on, reverses it.
Every batch holds 32 samples of each training domain, in domain order (`DomainBatchSampler`): Fishr
compares the domains' gradient variances, so each needs samples in every batch.
Runs on CPU in seconds:  python examples/plain_lightning.py  [--steps N]
"""

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from fishr_lightning import DomainBatchSampler, FishrCallback


def make_domain(domain: int, spurious_agreement: float, n: int = 512, seed: int = 0) -> TensorDataset:
    """Label from a noisy invariant feature; a second feature copies the label with probability
    `spurious_agreement` (the correlation that changes between domains)."""
    g = torch.Generator().manual_seed(seed * 100 + domain)
    y = torch.randint(0, 2, (n,), generator=g)
    invariant = (2 * y - 1) + 1.0 * torch.randn(n, generator=g)
    agree = torch.rand(n, generator=g) < spurious_agreement
    spurious = torch.where(agree, 2 * y - 1, 1 - 2 * y) + 0.1 * torch.randn(n, generator=g)
    noise = torch.randn(n, 6, generator=g)
    x = torch.cat([invariant[:, None], spurious[:, None], noise], dim=1)
    return TensorDataset(x, y, torch.full((n,), domain))


class Classifier(pl.LightningModule):
    """An ordinary module: it knows nothing of Fishr."""

    def __init__(self) -> None:
        super().__init__()
        self.featurizer = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.classifier = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def training_step(self, batch, batch_idx):
        x, y, _domain = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _domain = batch
        self.log("test_domain/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main(steps: int = 128) -> None:
    pl.seed_everything(0)
    test = make_domain(3, 0.1)
    # --8<-- [start:balanced]
    domains = [make_domain(e, p) for e, p in enumerate([0.95, 0.85, 0.75])]  # items (x, y, domain)
    sampler = DomainBatchSampler([len(d) for d in domains], batch_size=32, total_steps=steps, seed=0)
    train_loader = DataLoader(ConcatDataset(domains), batch_sampler=sampler)  # 32 of domain 0, then 1, then 2
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[FishrCallback(penalty_weight=100.0, warmup_steps=20, ema=0.9, head="classifier", num_domains=3)],
    )
    trainer.fit(Classifier(), train_loader, DataLoader(test, batch_size=512))
    # --8<-- [end:balanced]
    print("accuracy on the unseen domain:", trainer.callback_metrics["test_domain/acc"].item())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=128, help="training steps (default 128)")
    main(parser.parse_args().steps)
