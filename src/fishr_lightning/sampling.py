"""Per-domain balanced batches: ``DomainBatchSampler``, the sampler the app trains with, for any loader.

Fishr compares the gradient variances of the training domains, so every batch needs samples of every
domain (``FishrInputError`` otherwise); a shuffled loader over the concatenated domains gives that only
by chance. Pure torch: it works with the Trainer, Fabric or a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from fishr_lightning.functional import FishrInputError
from fishr_lightning.seeds import seed_hash


class DomainBatchSampler(Sampler[list[int]]):
    """Batches of a ``ConcatDataset`` of the training domains: ``batch_size`` indices drawn with
    replacement from each domain (DomainBed's ``InfiniteDataLoader``), until step ``total_steps``.

    A batch holds ``batch_size`` samples of domain 0, then ``batch_size`` of domain 1, and so on, whatever
    the domains' sizes: every domain equally represented, in domain order. Pass it as a ``DataLoader``'s
    ``batch_sampler`` over ``ConcatDataset(domains)``, with ``domain_sizes=[len(d) for d in domains]``.

    Step ``t``'s draw depends only on ``(seed, t)``, so a run resumed at step ``t`` sees the batches
    the uninterrupted run would have seen. ``first_step`` is read when iteration starts (after
    Lightning restored the step counter from a checkpoint: ``lambda: trainer.global_step``). Process
    ``rank`` of ``world_size`` takes the ``rank``-th of ``world_size`` equal slices of each domain's
    draw: together the processes see the one-process batch (under DDP give the Trainer
    ``use_distributed_sampler=False``, the sampler shares the batch itself).

    With ``keyed``, each index comes as ``(step, slot, index)``, ``slot`` its position in the step's
    whole batch (all processes), for a dataset that seeds each sample's augmentation with it (the app's
    ``SeededSamples``).

    Args:
        domain_sizes: the number of samples of each training domain, in the ``ConcatDataset``'s order.
        batch_size: samples of each domain per step (of all processes together).
        total_steps: the step at which iteration stops (the Trainer's ``max_steps``).
        seed: the draws' seed.
        first_step: the step iteration starts at, read when it starts.
        rank: this process's rank.
        world_size: the number of processes; it must divide ``batch_size``.
        keyed: yield ``(step, slot, index)`` keys instead of indices.
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        first_step: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        keyed: bool = False,
    ) -> None:
        if batch_size % world_size:
            raise FishrInputError(
                f"batch_size={batch_size} is the per-domain batch of the whole step, shared by {world_size} "
                f"processes, and {world_size} does not divide it: choose a batch_size divisible by the number "
                "of processes (the Trainer's devices × num_nodes), or another number of processes."
            )
        empty = [domain for domain, size in enumerate(domain_sizes) if size < 1]
        if empty:
            raise FishrInputError(
                f"Training domain(s) {empty} have no samples (domain_sizes={list(domain_sizes)}): every domain "
                "the sampler draws from needs at least one; leave empty domains out of the ConcatDataset."
            )
        self.domain_sizes = list(domain_sizes)
        self.domain_offsets = np.cumsum([0] + self.domain_sizes[:-1]).tolist()
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.seed = seed
        self.first_step = first_step
        self.rank = rank
        self.world_size = world_size
        self.keyed = keyed

    def batch_at(self, step: int) -> list[int] | list[tuple[int, int, int]]:
        """Step ``step``'s batch (this process's share): indices into the ``ConcatDataset``, or keys."""
        generator = torch.Generator().manual_seed(seed_hash(self.seed, step))
        share = self.batch_size // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        indices = [
            (offset + torch.randint(size, (self.batch_size,), generator=generator))[mine]
            for offset, size in zip(self.domain_offsets, self.domain_sizes)
        ]
        batch = torch.cat(indices).tolist()
        if not self.keyed:
            return batch
        slots = [
            domain * self.batch_size + slot for domain in range(len(indices)) for slot in range(self.batch_size)[mine]
        ]
        return [(step, slot, index) for slot, index in zip(slots, batch)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step(), self.total_steps):
            yield self.batch_at(step)

    def __len__(self) -> int:
        return max(self.total_steps - self.first_step(), 0)
