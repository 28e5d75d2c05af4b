"""The app's module runs DomainBed's Mixup (mixed inputs, one forward per pair with trainable
BatchNorm) and, for CORAL, MMD and GroupDRO, one forward per domain: trained weights equal
DomainBed's update() (tests/baselines_reference.py) on the same batches and draws."""

from __future__ import annotations

import copy

import baselines_reference as ref
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning.app.seeding import seed_hash
from fishr_lightning.app.training.module import DomainClassifier

E, B, STEPS, LR = 3, 6, 4, 0.05


class TinyFeaturizer(nn.Sequential):
    def __init__(self, batchnorm: bool):
        super().__init__(nn.Linear(5, 8), *([nn.BatchNorm1d(8)] if batchnorm else []), nn.Tanh())
        self.n_outputs = 8


def app_module(batchnorm: bool, **options) -> DomainClassifier:
    torch.manual_seed(0)
    return DomainClassifier(TinyFeaturizer(batchnorm), num_classes=3, lr=LR, **options).double()


def domain_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The app's layout: each step's batch is one contiguous block of B samples per domain."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * E * B, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (steps * E * B,), generator=g)
    domains = torch.arange(E).repeat_interleave(B).repeat(steps)
    return x, y, domains


def loader():
    return DataLoader(TensorDataset(*domain_batches()), batch_size=E * B, shuffle=False)


def minibatches_of_each_step():
    x, y, _ = domain_batches()
    for step in range(STEPS):
        rows = slice(step * E * B, (step + 1) * E * B)
        yield [(xb, yb) for xb, yb in zip(x[rows].split(B), y[rows].split(B))]


def fit(module, callbacks=()):
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, loader())
    return trainer


def assert_same_weights(module, algorithm):
    expected = nn.Sequential(algorithm.featurizer, algorithm.classifier).state_dict()
    actual = nn.Sequential(module.featurizer, module.classifier).state_dict()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["one_forward", "forward_per_pair"])
def test_mixup_equals_domainbeds_update(batchnorm):
    alpha = 0.4
    module = app_module(batchnorm, per_domain_forward=True, mixup_alpha=alpha, mixup_seed=3)
    algorithm = ref.DomainBedAlgorithm(
        "Mixup", copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier), {"mixup_alpha": alpha}, LR
    )
    for step, minibatches in enumerate(minibatches_of_each_step()):
        # The app's draws: each step's permutation and λ's from (mixup_seed, step) only.
        seed = seed_hash(3, step)
        perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed)).tolist()
        lams = np.random.RandomState(seed).beta(alpha, alpha, size=E)
        algorithm.update(minibatches, lams=[float(lam) for lam in lams], perm=perm)
    fit(module)
    assert_same_weights(module, algorithm)


def test_one_forward_per_domain_only_with_trainable_batchnorm():
    assert app_module(True, per_domain_forward=True).forwards_per_domain()
    assert not app_module(False, per_domain_forward=True).forwards_per_domain()
    assert not app_module(True).forwards_per_domain()
    frozen = app_module(True, per_domain_forward=True)
    frozen.featurizer[1].eval()
    assert not frozen.forwards_per_domain()
