"""DomainBed's data protocol as a LightningDataModule.

- Every domain is split into an *in* split (training, or test scores for test domains) and an
  *out* split (``holdout_fraction``, model selection), seeded by ``trial_seed`` through a local RNG:
  the splits are DomainBed's ``misc.split_dataset`` splits, index for index, whatever the global seed.
- A training step draws ``batch_size`` samples from each training domain (the *global* step's batch:
  under DDP each of the W processes takes its ``batch_size / W`` share of the same draw), passed as
  ``(x, y, domain)`` with ``domain`` renumbered ``0 .. E-1`` over the training domains.
- Evaluation reads every domain's in and out split (test domains included), ``env{i}_in`` then
  ``env{i}_out``; as in DomainBed, the training domains' splits go through the training augmentation
  (``eval_augmentation``), with a draw seeded per sample by ``(seed, step, split, index)``. Under DDP
  each process evaluates every W-th sample: every sample counts once, none is repeated.
- The fast image pipeline (``data.pipeline=fast``) ships uint8 images with their per-sample parameters
  (``fast_images.UInt8Images``) and finishes them on the device in ``on_after_batch_transfer``, for
  training batches (Lightning's transfer) and evaluation batches (``trainer.strategy.batch_to_device``) alike.
  Its training augmentation is drawn per sample from ``(seed, step, slot)`` (the sampler yields
  ``(step, slot, index)`` keys), so a batch is the same whatever the number of workers and after a resume.
  ``data.finish`` says where that device part runs (``finishes_in_workers``): ``device`` runs it, and with
  ``data.decode=device`` the JPEG decode, after Lightning's transfer on any device, the CPU included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from fishr_lightning import sampling
from fishr_lightning.app import AppError
from fishr_lightning.app.data.fast_images import FastImageTransform, MixedImages, UInt8Images, collate_images
from fishr_lightning.app.data.loader_workers import PreemptionSignalsIgnored
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
    """Items ``indices`` of a domain, transformed; with ``domain_id`` set, items are ``(x, y, domain_id)``.

    With ``seed`` set, the transform's random draws for item ``i`` at evaluation ``step`` come from a
    generator seeded by ``(seed, step, name, i)`` (``item(i, step)``): a random augmentation that is the
    same in every re-run, every process layout and every worker."""

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable | None,
        domain_id: int | None = None,
        seed: int | None = None,
        name: str = "",
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.domain_id = domain_id
        self.seed = seed
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return self.item(index)

    def item(self, index: int, step: int = 0) -> tuple[Any, ...]:
        x, y = self.dataset[self.indices[index]]
        if self.transform is not None:
            if self.seed is None:
                x = self.transform(x)
            else:
                # torchvision's random transforms draw from torch's global RNG: fork it, seed it per sample.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed_hash(self.seed, step, self.name, index))
                    x = self.transform(x)
        y = torch.as_tensor(y, dtype=torch.long)
        if self.domain_id is None:
            return x, y
        return x, y, torch.tensor(self.domain_id, dtype=torch.long)


class DomainBatchSampler(sampling.DomainBatchSampler):
    """The public ``fishr_lightning.DomainBatchSampler`` (issue 30: users' own loaders draw the app's
    batches with it), whose batch the processes cannot share is an ``AppError``, the app's ``error:`` line."""

    def __init__(
        self, domain_sizes: Sequence[int], batch_size: int, total_steps: int, seed: int, **options: Any
    ) -> None:
        check_batch_divides(batch_size, options.get("world_size", 1))
        super().__init__(domain_sizes, batch_size, total_steps, seed, **options)


def check_batch_divides(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise AppError(
            f"batch_size={batch_size} is the per-domain batch of the whole step, shared by {world_size} "
            f"processes, and {world_size} does not divide it: choose a batch_size divisible by the number of "
            "processes (trainer.devices × trainer.num_nodes), or another number of processes."
        )


class FinishedInWorker:
    """A fast-pipeline item transform followed by its device part on this one sample (``UInt8Images`` →
    normalised float tensor): the device part where the device is the CPU (``finishes_in_workers``)."""

    def __init__(self, transform: Callable, batch_transform: Callable) -> None:
        self.transform = transform
        self.batch_transform = batch_transform

    def __call__(self, item: Any) -> Tensor:
        images = self.transform(item)
        return self.batch_transform(UInt8Images(images.pixels[None], images.params[None]))[0]


class SeededSamples(Dataset):
    """``dataset``'s items by ``(step, slot, index)`` keys (``DomainBatchSampler(keyed=True)``), each
    transformed under torch's global RNG seeded by ``(seed, step, slot)``: the training augmentation is a
    function of the step and the sample's place in the batch only, not of the worker that draws it."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        step, slot, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_hash(self.seed, step, "train", slot))
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


def default_num_workers(processes_per_node: int = 1) -> int:
    """Loader workers per loader: the cores this process may use (``os.sched_getaffinity``) shared among
    the node's processes, less one for the process itself (0, loading in the process, on one core).

    Where the launcher bound each task to its own cores (srun's CPU binding: fewer cores than SLURM gave
    the job on this node, ``SLURM_CPUS_ON_NODE``), the affinity is already this process's share and is not
    divided again (issue 25); processes that Lightning launches itself inherit the whole affinity."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    node_cores = os.environ.get("SLURM_CPUS_ON_NODE", "")
    bound_by_launcher = node_cores.isdigit() and cores < int(node_cores)
    return max(cores // (1 if bound_by_launcher else max(processes_per_node, 1)) - 1, 0)


EvaluationKey = tuple[int, int, int]  # (step, split, index in the split)


class EvaluationSplits(Dataset):
    """Every evaluation split behind one dataset, addressed by ``(step, split, index)`` keys: the key
    carries the evaluation's step to the workers, so one loader with persistent workers serves every
    evaluation of a run. Items are ``(x, y, split)``."""

    def __init__(self, splits: Sequence[DomainSplit]) -> None:
        self.splits = list(splits)

    def __getitem__(self, key: EvaluationKey) -> tuple[Any, Any, Tensor]:
        step, split, index = key
        x, y = self.splits[split].item(index, step)
        return x, y, torch.tensor(split, dtype=torch.long)


class EvaluationSampler(Sampler[list[EvaluationKey]]):
    """Batches of keys for the evaluation asked for last (``ask``): for each split asked for, in order,
    process ``rank``'s samples ``rank, rank + W, ...`` in batches of ``batch_size``, never mixing
    splits (DomainBed evaluates each split with its own loader, in batches of 64). It runs in the main
    process, so a new ``ask`` before each evaluation reaches persistent workers through the keys."""

    def __init__(self, split_sizes: Sequence[int], batch_size: int) -> None:
        self.split_sizes = list(split_sizes)
        self.batch_size = batch_size
        self.ask(step=0)

    def ask(self, step: int, rank: int = 0, world_size: int = 1, splits: Sequence[int] | None = None) -> None:
        self.step, self.rank, self.world_size = step, rank, world_size
        self.splits = list(range(len(self.split_sizes))) if splits is None else list(splits)

    def __iter__(self) -> Iterator[list[EvaluationKey]]:
        for split in self.splits:
            shard = range(self.rank, self.split_sizes[split], self.world_size)
            for start in range(0, len(shard), self.batch_size):
                yield [(self.step, split, index) for index in shard[start : start + self.batch_size]]

    def __len__(self) -> int:
        shards = (len(range(self.rank, self.split_sizes[split], self.world_size)) for split in self.splits)
        return sum(-(-size // self.batch_size) for size in shards)


class DomainBedDataModule(pl.LightningDataModule):
    """Args:
    data: the dataset's domains (``datasets.load_domains``).
    test_envs: indices of the held-out domains.
    holdout_fraction: share of each domain in its out split (DomainBed: 0.2).
    trial_seed: seeds the splits.
    seed: seeds the training batches.
    batch_size: per training domain, per step (of all processes together).
    steps: training steps in all.
    eval_batch_size: batch size of the evaluation loaders (DomainBed: 64).
    eval_augmentation: evaluate the training domains' splits through the training transform, as
        DomainBed (its training environments carry the augmentation); False: without it.
    num_workers, pin_memory, persistent_workers: the DataLoaders' (keep a GPU fed); persistent workers
        serve the training loader and the one evaluation loader for the whole run. ``num_workers=None``:
        ``default_num_workers`` for the trainer's processes on this node.
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
        num_workers: int | None = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_augmentation: bool = True,
    ) -> None:
        super().__init__()
        self.eval_augmentation = eval_augmentation
        self.data = data
        self.test_envs = sorted(test_envs)
        self.train_envs = [env for env in range(len(data.domains)) if env not in self.test_envs]
        self.seed = seed
        self.batch_size = batch_size
        self.steps = steps
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.splits = [
            split_indices(len(domain), holdout_fraction, seed_hash(trial_seed, env))
            for env, domain in enumerate(data.domains)
        ]
        self._eval_loaders: dict[bool, DataLoader] = {}  # by augmentation

    @property
    def loader_options(self) -> dict[str, Any]:
        num_workers = self.num_workers
        if num_workers is None:
            num_workers = default_num_workers(self.trainer.num_devices if self.trainer is not None else 1)
        return {
            "num_workers": num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and num_workers > 0,
            "collate_fn": collate_images,  # default_collate, but for JPEGs left to the device (data.decode=device)
            "worker_init_fn": PreemptionSignalsIgnored(),  # on every loader of the app (issue 25)
        }

    @property
    def eval_names(self) -> list[str]:
        names = [f"env{env}_in" for env in range(len(self.splits))]
        return names + [f"env{env}_out" for env in range(len(self.splits))]

    @property
    def steps_per_epoch(self) -> float:
        """DomainBed's: the smallest in split (test domains included) over the batch size."""
        return min(len(in_indices) for in_indices, _ in self.splits) / self.batch_size

    @property
    def finishes_in_workers(self) -> bool:
        """Whether the fast pipeline's device part runs per sample in the loader workers (``data.finish``):
        ``workers``; ``device``: never, it runs in ``on_after_batch_transfer`` (the GPU's code path, on any
        device); ``auto``: on a CPU-only run, in parallel as DomainBed's augmentation does, not in the training
        process between steps (the same operations and parameters, so the same tensors)."""
        if self.data.batch_transform is not None and self.data.finish != "auto":
            return self.data.finish == "workers"
        trainer = self.trainer
        return (
            self.data.batch_transform is not None
            and trainer is not None
            and getattr(getattr(trainer, "strategy", None), "root_device", None) is not None
            and trainer.strategy.root_device.type == "cpu"
        )

    def item_transform(self, transform: Callable | None) -> Callable | None:
        if transform is not None and self.finishes_in_workers:
            if isinstance(transform, FastImageTransform) and transform.decode_on_device:  # the device is the CPU
                transform = FastImageTransform(
                    transform.output_size,
                    transform.augment,
                    decode_on_device=False,
                    reader=transform.reader,
                    random_crop=transform.random_crop,  # Spawrious' augmentation has none (issue 28)
                )
            return FinishedInWorker(transform, self.data.batch_transform)
        return transform

    def train_dataset(self) -> ConcatDataset:
        transform = self.item_transform(self.data.train_transform)
        return ConcatDataset(
            [
                DomainSplit(self.data.domains[env], self.splits[env][0], transform, domain_id)
                for domain_id, env in enumerate(self.train_envs)
            ]
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        trainer = self.trainer
        keyed = self.data.batch_transform is not None  # the fast pipeline: augmentation seeded per sample
        sampler = DomainBatchSampler(
            domain_sizes=[len(split) for split in dataset.datasets],
            batch_size=self.batch_size,
            total_steps=self.steps,
            seed=self.seed,
            first_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            keyed=keyed,
        )
        samples = SeededSamples(dataset, self.seed) if keyed else dataset
        options = self.loader_options
        if int(os.environ.get("PL_SEED_WORKERS", 0)):  # Lightning seeds the workers of a loader without worker_init_fn
            options["worker_init_fn"] = PreemptionSignalsIgnored(partial(pl_worker_init_function, rank=sampler.rank))
        return DataLoader(samples, batch_sampler=sampler, **options)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The fast pipeline's device part: ``(UInt8Images, y, group)`` → ``(x, y, group)``, ``x`` normalised
        (``data.batch_transform``) in the precision plugin's input type; any other batch unchanged."""
        if self.data.batch_transform is not None and isinstance(batch, (tuple, list)) and batch:
            if isinstance(batch[0], (UInt8Images, MixedImages)):
                x = self.data.batch_transform(batch[0])
                if self.trainer is not None:
                    # Lightning converted the batch (16-true/bf16-true: to half) before this hook, when x was
                    # still uint8: the images made here are converted as it would have converted them.
                    x = self.trainer.precision_plugin.convert_input(x)
                return (x, *batch[1:])
        return batch

    def training_batches(self, first_step: int, num_steps: int) -> DataLoader:
        """The training batches of steps ``first_step .. first_step + num_steps - 1``, this process's
        share, as the training loader draws them: past the run's last step too. SWAD's BatchNorm
        re-estimation reads the steps after the last (khanrc/swad's ``update_bn`` draws the next
        batches of the run's infinite training iterator), whatever step the run ended at.

        Each sample's augmentation is seeded by ``(seed, step, slot)`` (``SeededSamples``), whatever the
        pipeline: the statistics re-estimated on these batches are the same after a resume and with any
        number of loader workers (issue 25; unseeded, they drew from the RNG of the process or worker)."""
        trainer = self.trainer
        dataset = self.train_dataset()
        sampler = DomainBatchSampler(
            domain_sizes=[len(split) for split in dataset.datasets],
            batch_size=self.batch_size,
            total_steps=first_step + num_steps,
            seed=self.seed,
            first_step=lambda: first_step,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            keyed=True,
        )
        options = {**self.loader_options, "persistent_workers": False}  # read once
        return DataLoader(SeededSamples(dataset, self.seed), batch_sampler=sampler, **options)

    def eval_splits(self, augmentation: bool | None = None) -> list[DomainSplit]:
        """Every domain's in split, then every out split (``eval_names``' order); the training domains'
        through the training transform when ``augmentation`` (default: ``eval_augmentation``)."""
        augmentation = self.eval_augmentation if augmentation is None else augmentation
        splits = []
        for split_index, split in enumerate(("in", "out")):
            for env, domain in enumerate(self.data.domains):
                augmented = augmentation and env in self.train_envs and self.data.train_transform is not None
                splits.append(
                    DomainSplit(
                        domain,
                        self.splits[env][split_index],
                        self.item_transform(self.data.train_transform if augmented else self.data.eval_transform),
                        seed=self.seed if augmented else None,
                        name=f"env{env}_{split}",
                    )
                )
        return splits

    def eval_loader(
        self,
        step: int,
        rank: int = 0,
        world_size: int = 1,
        splits: Sequence[int] | None = None,
        augmentation: bool | None = None,
    ) -> DataLoader:
        """The evaluation at ``step`` of ``splits`` (indices into ``eval_splits()``; default all) as one
        loader of ``(x, y, split)`` batches; process ``rank`` reads samples ``rank, rank + W, ...`` of each.
        ``augmentation``: the training domains through the training transform (default:
        ``eval_augmentation``); SWAD's valley loss asks for ``False`` (khanrc/swad's ``val_augment=False``).

        One loader serves the whole run: with ``persistent_workers`` its worker pool is started once,
        not once per split and evaluation (DomainBed re-creates a loader per split, 12 pools per
        evaluation on DomainNet)."""
        augmentation = self.eval_augmentation if augmentation is None else augmentation
        if augmentation not in self._eval_loaders:
            eval_splits = self.eval_splits(augmentation)
            sampler = EvaluationSampler([len(split) for split in eval_splits], self.eval_batch_size)
            self._eval_loaders[augmentation] = DataLoader(
                EvaluationSplits(eval_splits), batch_sampler=sampler, **self.loader_options
            )
        loader = self._eval_loaders[augmentation]
        loader.batch_sampler.ask(step, rank, world_size, splits)
        return loader

    def teardown(self, stage: str) -> None:
        self._eval_loaders.clear()  # their persistent workers end with them
