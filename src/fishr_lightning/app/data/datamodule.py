"""DomainBed's data protocol as a LightningDataModule.

- Every domain is split into an *in* split (training, or test scores for test domains) and an
  *out* split (``holdout_fraction``, model selection), seeded by ``trial_seed`` through a local RNG:
  the splits are DomainBed's ``misc.split_dataset`` splits, index for index, whatever the global seed.
- A training step sees one minibatch of ``batch_size`` from each training domain, concatenated as
  ``(x, y, domain)`` with ``domain`` renumbered ``0 .. E-1`` over the training domains.
- Validation evaluates every domain's in and out split (test domains included) as the loaders
  ``env{i}_in`` then ``env{i}_out``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from fishr_lightning.app.data.specs import MultiDomainData
from fishr_lightning.app.seeding import seed_hash


def split_indices(length: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(in_indices, out_indices)``: DomainBed's ``split_dataset`` (its first ``n`` shuffled keys
    are the out split), with a local ``RandomState``."""
    keys = list(range(length))
    np.random.RandomState(seed).shuffle(keys)
    n_out = int(length * holdout_fraction)
    return keys[n_out:], keys[:n_out]


class DomainSplit(Dataset):
    """Items ``indices`` of a domain, transformed; with ``domain_id`` set, items are ``(x, y, domain_id)``."""

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], transform: Callable | None, domain_id: int | None = None
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.domain_id = domain_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        x, y = self.dataset[self.indices[index]]
        if self.transform is not None:
            x = self.transform(x)
        y = torch.as_tensor(y, dtype=torch.long)
        if self.domain_id is None:
            return x, y
        return x, y, torch.tensor(self.domain_id, dtype=torch.long)


class DomainBatchSampler(Sampler[list[int]]):
    """Batches of a ``ConcatDataset`` of the training domains: ``batch_size`` indices drawn with
    replacement from each domain (DomainBed's ``InfiniteDataLoader``), until step ``total_steps``.

    Step ``t``'s batch depends only on ``(seed, t, rank)``, so a run resumed at step ``t`` sees the
    batches the uninterrupted run would have seen. ``first_step`` is read when iteration starts
    (after Lightning restored the step counter from a checkpoint).
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        batch_size: int,
        total_steps: int,
        seed: int,
        first_step: Callable[[], int] = lambda: 0,
        rank: int = 0,
    ) -> None:
        self.domain_sizes = list(domain_sizes)
        self.domain_offsets = np.cumsum([0] + self.domain_sizes[:-1]).tolist()
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.seed = seed
        self.first_step = first_step
        self.rank = rank

    def batch_at(self, step: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed_hash(self.seed, step, self.rank))
        indices = [
            offset + torch.randint(size, (self.batch_size,), generator=generator)
            for offset, size in zip(self.domain_offsets, self.domain_sizes)
        ]
        return torch.cat(indices).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step(), self.total_steps):
            yield self.batch_at(step)

    def __len__(self) -> int:
        return max(self.total_steps - self.first_step(), 0)


class DomainBedDataModule(pl.LightningDataModule):
    """Args:
    data: the dataset's domains (``datasets.load_domains``).
    test_envs: indices of the held-out domains.
    holdout_fraction: share of each domain in its out split (DomainBed: 0.2).
    trial_seed: seeds the splits.
    seed: seeds the training batches.
    batch_size: per training domain, per step.
    steps: training steps in all.
    eval_batch_size: batch size of the evaluation loaders (DomainBed: 64).
    num_workers, pin_memory, persistent_workers: the DataLoaders' (keep a GPU fed).
    """

    def __init__(
        self,
        data: MultiDomainData,
        test_envs: Sequence[int],
        holdout_fraction: float,
        trial_seed: int,
        seed: int,
        batch_size: int,
        steps: int,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        self.data = data
        self.test_envs = sorted(test_envs)
        self.train_envs = [env for env in range(len(data.domains)) if env not in self.test_envs]
        self.seed = seed
        self.batch_size = batch_size
        self.steps = steps
        self.eval_batch_size = eval_batch_size
        self.loader_options = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "persistent_workers": persistent_workers and num_workers > 0,
        }
        self.splits = [
            split_indices(len(domain), holdout_fraction, seed_hash(trial_seed, env))
            for env, domain in enumerate(data.domains)
        ]

    @property
    def eval_names(self) -> list[str]:
        names = [f"env{env}_in" for env in range(len(self.splits))]
        return names + [f"env{env}_out" for env in range(len(self.splits))]

    @property
    def steps_per_epoch(self) -> float:
        """DomainBed's: the smallest in split (test domains included) over the batch size."""
        return min(len(in_indices) for in_indices, _ in self.splits) / self.batch_size

    def train_dataset(self) -> ConcatDataset:
        return ConcatDataset(
            [
                DomainSplit(self.data.domains[env], self.splits[env][0], self.data.train_transform, domain_id)
                for domain_id, env in enumerate(self.train_envs)
            ]
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        trainer = self.trainer
        sampler = DomainBatchSampler(
            domain_sizes=[len(split) for split in dataset.datasets],
            batch_size=self.batch_size,
            total_steps=self.steps,
            seed=self.seed,
            first_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
        )
        return DataLoader(dataset, batch_sampler=sampler, **self.loader_options)

    def val_dataloader(self) -> list[DataLoader]:
        in_splits = [
            DomainSplit(domain, in_indices, self.data.eval_transform)
            for domain, (in_indices, _) in zip(self.data.domains, self.splits)
        ]
        out_splits = [
            DomainSplit(domain, out_indices, self.data.eval_transform)
            for domain, (_, out_indices) in zip(self.data.domains, self.splits)
        ]
        # Workers of 2×(domains) evaluation loaders are not kept alive between evaluations: with
        # DomainNet's 6 domains that would be 12 pools of idle processes.
        eval_options = {**self.loader_options, "persistent_workers": False}
        return [
            DataLoader(split, batch_size=self.eval_batch_size, shuffle=False, **eval_options)
            for split in in_splits + out_splits
        ]
