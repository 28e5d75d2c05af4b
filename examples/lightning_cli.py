"""FishrCallback from LightningCLI: a YAML config, or the command line.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --trainer.max_steps=50 \\
        --trainer.callbacks+=fishr_lightning.FishrCallback \\
        --trainer.callbacks.penalty_weight=100 --trainer.callbacks.warmup_steps=10

Every argument of FishrCallback is type-annotated, so jsonargparse validates it (needs the `cli`
extra: ``pip install "fishr-lightning[cli]"``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DomainData(pl.LightningDataModule):
    """``(x, y, domain)`` batches: ``num_domains`` domains whose inputs are shifted differently."""

    def __init__(
        self, num_domains: int = 3, samples_per_domain: int = 128, batch_size: int = 48, seed: int = 0
    ) -> None:
        super().__init__()
        self.num_domains, self.samples_per_domain, self.batch_size, self.seed = (
            num_domains,
            samples_per_domain,
            batch_size,
            seed,
        )

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_domains * self.samples_per_domain
        domains = torch.arange(n) % self.num_domains
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 8, generator=g) + domains[:, None].float() * 0.5
        x[:, 0] += 2 * y - 1
        return DataLoader(TensorDataset(x, y, domains), batch_size=self.batch_size)


class Classifier(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.featurizer = nn.Sequential(nn.Linear(8, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, 2)

    def training_step(self, batch, batch_idx):
        x, y, _domains = batch
        return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(Classifier, DomainData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
