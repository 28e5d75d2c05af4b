"""Shared pieces of the DomainBed algorithm tests (issue 26): a small DomainBed-shaped featurizer, float64
batches of several domains, and ``fit`` (K updates of ``trainer.fit`` on those batches). The references the
modules are compared with are written in each test from DomainBed's formulas."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

INPUT_DIM, NUM_CLASSES, NUM_DOMAINS, PER_DOMAIN = 6, 3, 3, 8


class TinyFeaturizer(nn.Module):
    """Two linear layers with a ReLU (BatchNorm-free, deterministic): ``n_outputs = 5``."""

    n_outputs = 5

    def __init__(self, input_shape: tuple[int, ...], hparams: dict[str, Any]) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_shape[0], 7)
        self.output = nn.Linear(7, self.n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(torch.relu(self.hidden(x)))


def domain_batches(steps: int, seed: int = 0, num_domains: int = NUM_DOMAINS, per_domain: int = PER_DOMAIN):
    """``steps`` batches ``(x, y, domain)`` in float64, each domain a contiguous block, as the app's loader."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(num_domains * per_domain, INPUT_DIM, generator=generator, dtype=torch.float64)
        y = torch.randint(0, NUM_CLASSES, (num_domains * per_domain,), generator=generator)
        domain = torch.arange(num_domains).repeat_interleave(per_domain)
        x = x + domain[:, None].double()  # shifted domains
        batches.append((x, y, domain))
    return batches


def minibatches_of(batch) -> list[tuple[Tensor, Tensor]]:
    x, y, domain = batch
    return [(x[domain == d], y[domain == d]) for d in torch.unique(domain).tolist()]


def fit(module: pl.LightningModule, batches, ckpt_path: str | None = None, root: str | None = None, **trainer_kwargs):
    """``len(batches)`` updates of ``trainer.fit`` in float64 on the CPU; returns the trainer."""
    trainer = pl.Trainer(
        max_steps=trainer_kwargs.pop("max_steps", len(batches)),
        accelerator="cpu",
        devices=1,
        precision=trainer_kwargs.pop("precision", "64-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **trainer_kwargs,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def float64_state(module: nn.Module) -> dict[str, Tensor]:
    return {
        k: (v.double() if v.is_floating_point() else v).clone() for k, v in copy.deepcopy(module.state_dict()).items()
    }


def max_relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """The largest ``|a − b| / max(|b|, 1e-12)``-norm ratio over the shared float keys."""
    worst = 0.0
    for key in a:
        if a[key].is_floating_point() and a[key].numel():
            worst = max(worst, float((a[key] - b[key]).norm() / b[key].norm().clamp_min(1e-12)))
    return worst


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is fastest (two spin against each other on a busy machine). Autouse in
    every test file that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorded(pl.Callback):
    """The values each update returned (DomainBed's logged dict)."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["domainbed"])
