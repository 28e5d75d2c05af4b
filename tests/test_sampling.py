"""``fishr_lightning.DomainBatchSampler`` in a user's own loader (issue 30): every batch holds every
training domain equally, in domain order, and ``FishrCallback`` trains on it; the error for a batch
missing a domain names it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

import fishr_lightning
from fishr_lightning import DomainBatchSampler, FishrCallback, FishrInputError

SIZES, BATCH, STEPS = (30, 7, 50), 4, 5  # unequal domains: a shuffled loader would give mostly domain 0


def user_domains() -> list[TensorDataset]:
    g = torch.Generator().manual_seed(0)
    return [
        TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 2, (n,), generator=g), torch.full((n,), e))
        for e, n in enumerate(SIZES)
    ]


class Recording(pl.LightningModule):
    """A user's module that keeps the domain labels of every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.featurizer, self.classifier = nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Linear(6, 2)
        self.seen_domains: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, domains = batch
        self.seen_domains.append(domains.tolist())
        return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(loader: DataLoader, penalty_weight: float) -> tuple[Recording, FishrCallback]:
    module, callback = Recording(), FishrCallback(penalty_weight=penalty_weight, warmup_steps=0, num_domains=3)
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[callback], **options).fit(module, loader)
    return module, callback


def test_a_users_loader_with_the_public_sampler_has_every_domain_equally_in_order_and_fishr_trains_on_it():
    assert "DomainBatchSampler" in fishr_lightning.__all__
    domains = user_domains()
    dataset = ConcatDataset(domains)
    sampler = DomainBatchSampler([len(d) for d in domains], batch_size=BATCH, total_steps=STEPS, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == STEPS
    for x, _y, domain in batches:
        assert domain.tolist() == [0] * BATCH + [1] * BATCH + [2] * BATCH
        # Each domain's block holds that domain's samples (drawn with replacement), whatever its size.
        for e, d in enumerate(domains):
            rows = {tuple(row.tolist()) for row in d.tensors[0]}
            assert all(tuple(row.tolist()) in rows for row in x[e * BATCH : (e + 1) * BATCH])
    assert len({tuple(x[:BATCH].flatten().tolist()) for x, _, _ in batches}) == STEPS  # a new draw each step

    module, callback = fit(loader, penalty_weight=10.0)
    assert module.seen_domains == [[0] * BATCH + [1] * BATCH + [2] * BATCH] * STEPS
    assert callback.last_penalty is not None and torch.isfinite(torch.as_tensor(callback.last_penalty))
    assert float(callback.last_penalty) > 0
    erm, _ = fit(DataLoader(dataset, batch_sampler=sampler), penalty_weight=0.0)
    assert not torch.equal(module.classifier.weight, erm.classifier.weight)  # the penalty reached the weights


def test_the_missing_domain_error_names_the_public_sampler():
    dataset = ConcatDataset(user_domains())
    in_order = DataLoader(dataset, batch_size=3 * BATCH, shuffle=False)  # the first batch is all domain 0
    with pytest.raises(FishrInputError, match=r"fishr_lightning\.DomainBatchSampler"):
        fit(in_order, penalty_weight=10.0)


def test_a_batch_the_processes_cannot_share_is_refused_with_what_to_do():
    with pytest.raises(FishrInputError, match=r"batch_size=6 .* 4 does not divide it"):
        DomainBatchSampler([10, 10], batch_size=6, total_steps=3, world_size=4)
