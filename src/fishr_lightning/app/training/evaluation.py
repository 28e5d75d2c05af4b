"""DomainBed's evaluation schedule and records, as a Lightning callback.

DomainBed's ``train.py`` runs ``for step in range(n_steps)``: one update, then, when
``step % checkpoint_freq == 0`` or ``step == n_steps - 1``, an evaluation recorded as ``'step': step``.
So ``steps=5001, checkpoint_freq=300`` gives 5001 updates and records at 0, 300, ..., 4800, 5000.
This callback does the same after Lightning's update ``step + 1`` (``trainer.global_step``): it
evaluates every split exactly once across processes (each reads every W-th sample; the counts are
summed), writes the record on rank 0, logs its accuracies to the Lightning loggers (``acc/env0_in``,
..., ``acc/val_training_domain``; issue 30), and saves the resume checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fishr_lightning.app.data.datamodule import DomainBedDataModule
from fishr_lightning.app.reporting.results import RecordWriter
from fishr_lightning.head_penalty import DOMAINBED_LOSS_KEY


def is_record_step(step: int, steps: int, checkpoint_freq: int) -> bool:
    """DomainBed's test: ``step`` is the 0-based index of the update just done."""
    return step % checkpoint_freq == 0 or step == steps - 1


def record_steps(steps: int, checkpoint_freq: int) -> list[int]:
    return [step for step in range(steps) if is_record_step(step, steps, checkpoint_freq)]


def per_split_sums(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_splits: int,
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``[L, 2]`` float64: for each split, the sum of ``per_sample(logits, y_N)`` (``[N]``) over its
    samples and its number of samples, summed over processes (each reads its own share of every split),
    with the module in eval mode and ``torch.inference_mode``, on the training device. Each batch goes
    as Lightning's loops send one: the precision plugin's ``convert_input`` (``16-true``/``bf16-true``:
    half inputs), ``trainer.strategy.batch_to_device`` (with the batch transfer hooks, device-side
    transforms included), then the forward under the plugin's ``forward_context`` (autocast).
    ``loader`` yields ``(x, y_N, split_N)`` (``DomainBedDataModule.eval_loader``). Accuracies and
    SWAD's valley loss are both ratios of these sums, so every sample counts once whatever the number
    of processes."""
    sums_L2 = torch.zeros(num_splits, 2, dtype=torch.float64, device=trainer.strategy.root_device)
    precision = trainer.precision_plugin
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                # Through the batch hooks, as training batches: the fast image pipeline finishes its
                # images on the device there (DomainBedDataModule.on_after_batch_transfer).
                x, y_N, split_N = trainer.strategy.batch_to_device(precision.convert_input(batch), dataloader_idx=0)
                with precision.forward_context():
                    logits = pl_module(x)
                values_N = per_sample(logits.float(), y_N).double()
                sums_L2.index_add_(0, split_N, torch.stack([values_N, torch.ones_like(values_N)], dim=1))
    finally:
        pl_module.train(was_training)
    if trainer.world_size > 1:
        sums_L2 = trainer.strategy.reduce(sums_L2, reduce_op="sum")
    return sums_L2


def recorded_penalties(trainer: pl.Trainer) -> dict[str, float]:
    """The raw penalties of the last training step, from the callbacks that expose ``last_penalty`` (the
    contract of issue 18), under their record keys: DomainBed's ``penalty`` when one callback has one,
    ``<name>_penalty`` for each when several do (Fishr + IRM: ``fishr_penalty``, ``irm_penalty``; never
    their unweighted sum, issue 25), as DomainBed names several penalties (RDM's ``matching_penalty``)."""
    values = {
        getattr(cb, "name", type(cb).__name__): float(cb.last_penalty)
        for cb in trainer.callbacks
        if getattr(cb, "last_penalty", None) is not None
    }
    if len(values) == 1:
        return {"penalty": next(iter(values.values()))}
    return {f"{name}_penalty": value for name, value in values.items()}


def step_losses(outputs: Any, trainer: pl.Trainer) -> dict[str, float]:
    """The last training step's loss terms under the keys, and with the meaning, of DomainBed's ``update()``
    for the algorithm (issue 25): ``loss`` is the objective with its weighted penalty for ERM, Fishr, IRM,
    V-REx, GroupDRO (its robust loss) and Mixup, the cross-entropy alone for CORAL, MMD and SD (the penalty
    callbacks' ``DOMAINBED_LOSS_KEY``); ``nll`` the mean cross-entropy; the raw penalties as
    ``recorded_penalties``."""
    values = {}
    if isinstance(outputs, dict):
        if "loss" in outputs:
            values["loss"] = float(outputs.get(DOMAINBED_LOSS_KEY, outputs["loss"]))
        if "nll" in outputs:
            values["nll"] = float(outputs["nll"])
        # The algorithms of fishr_lightning.domainbed: the values DomainBed's update() returns, under its keys.
        values.update(outputs.get("domainbed", {}))
    return {**values, **recorded_penalties(trainer)}


# The section of the loggers' accuracies: TensorBoard, W&B and MLflow group the metrics by the name before
# the first "/" (issue 30). The averaged model's go under ``acc_swad/``, ``acc_ema/`` (``AveragedModelRecord``).
ACCURACY_SECTION = "acc"
# DomainBed's training-domain validation (``IIDAccuracySelectionMethod``): the mean of the training
# domains' out-split accuracies, the figure its model selection ranks the checkpoints by.
TRAINING_DOMAIN_VALIDATION = "val_training_domain"


def logged_accuracies(
    record: dict[str, Any], train_envs: Iterable[int], section: str = ACCURACY_SECTION
) -> dict[str, float]:
    """A record's accuracies under the names the loggers get: ``{section}/env{i}_{in,out}`` for each split
    (an empty split, whose accuracy is ``None``, is left out) and ``{section}/val_training_domain``, the
    mean of the training domains' ``env{i}_out_acc``."""
    metrics = {
        f"{section}/{key.removesuffix('_acc')}": value
        for key, value in record.items()
        if key.startswith("env") and key.endswith("_acc") and value is not None
    }
    validation = [record.get(f"env{env}_out_acc") for env in train_envs]
    if validation and None not in validation:
        metrics[f"{section}/{TRAINING_DOMAIN_VALIDATION}"] = float(np.mean(validation))
    return metrics


def log_accuracies(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """To every logger of the trainer, at DomainBed's ``step`` label: the x of ``train/nll`` for the same
    update (Lightning logs a step's ``self.log`` values at ``global_step - 1``, the batches done before it).
    Straight to the loggers, as LearningRateMonitor and HessianAlignmentCallback do, not through
    ``self.log``: that reaches them only at multiples of ``Trainer(log_every_n_steps)``, which would drop
    most records. Loggers write on rank 0 only (their ``log_metrics`` is ``rank_zero_only``); the callers
    call this there."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class DomainBedEvaluation(Callback):
    """Evaluates and records at DomainBed's steps; saves ``resume_checkpoint`` after each record but the last.

    Args:
        datamodule: gives the evaluation loader (``eval_loader``) and the splits' names.
        writer: writes and formats the records.
        steps: updates in all (DomainBed's ``n_steps``).
        checkpoint_freq: DomainBed's.
        steps_per_epoch: for the record's ``epoch`` (``step / steps_per_epoch``, as DomainBed).
        resume_checkpoint: where the resumable checkpoint goes after each record (``None``: nowhere).
    """

    def __init__(
        self,
        datamodule: DomainBedDataModule,
        writer: RecordWriter,
        steps: int,
        checkpoint_freq: int,
        steps_per_epoch: float,
        resume_checkpoint: Path | None,
    ) -> None:
        self.datamodule = datamodule
        self.writer = writer
        self.steps = steps
        self.checkpoint_freq = checkpoint_freq
        self.steps_per_epoch = steps_per_epoch
        self.resume_checkpoint = resume_checkpoint
        self.step_values: dict[str, list[float]] = defaultdict(list)
        self.last_record: dict[str, Any] | None = None
        self._step_started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            kept = self.writer.keep_records_before(trainer.global_step)
            self.last_record = kept[-1] if kept else None

    def state_dict(self) -> dict[str, Any]:
        # The loss terms of the steps since the last record: a run stopped between records (preempted,
        # issue 19) and resumed writes the next record's means over the same steps as an uninterrupted run.
        return {"step_values": {name: list(values) for name, values in self.step_values.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_values = defaultdict(list, {name: list(v) for name, v in state_dict.get("step_values", {}).items()})

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_values["step_time"].append(time.perf_counter() - self._step_started)
        for name, value in step_losses(outputs, trainer).items():
            self.step_values[name].append(value)
        step = trainer.global_step - 1  # DomainBed's label of the update just done
        if not is_record_step(step, self.steps, self.checkpoint_freq):
            return
        record = self.record(trainer, pl_module, step)
        if trainer.is_global_zero:
            self.writer.write(record)
            log_accuracies(trainer, logged_accuracies(record, self.datamodule.train_envs), step)
            self.print(trainer, self.writer.table_rows(record))
            self.last_record = record
        # Not after the last update: a run resumed from there would skip on_train_end (Lightning's fit loop
        # returns at once), so the averaged model, its BatchNorm statistics and model.ckpt would never be made;
        # a run that dies during that final work resumes from the previous record instead.
        if self.resume_checkpoint is not None and trainer.global_step < self.steps:
            # weights_only=False said explicitly: left out, Lightning 2.6 logs a line about it at every record.
            trainer.save_checkpoint(self.resume_checkpoint, weights_only=False)  # every rank: ends in a barrier

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch}
        # Each process saw its share of the step's batch (equal shares): the mean of the processes'
        # means is the whole batch's mean. The penalty is already the whole batch's.
        names = sorted(self.step_values)
        means = torch.tensor([float(np.mean(self.step_values[name])) for name in names], dtype=torch.float64)
        if trainer.world_size > 1:
            means = trainer.strategy.reduce(means.to(pl_module.device), reduce_op="mean").cpu()
        record.update({name: float(value) for name, value in zip(names, means)})
        self.step_values.clear()
        record.update(self.accuracies(trainer, pl_module, step))
        record["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        return record

    def accuracies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        """``{env{i}_{in,out}_acc: accuracy}`` over every split, each sample counted once."""
        loader = self.datamodule.eval_loader(step, trainer.global_rank, trainer.world_size)
        names = [f"{name}_acc" for name in self.datamodule.eval_names]
        sums_L2 = per_split_sums(
            trainer, pl_module, loader, len(names), lambda logits, y_N: logits.argmax(dim=1) == y_N
        )
        return {
            name: float(correct / total) if total > 0 else None  # DomainBed: an empty split has no accuracy
            for name, (correct, total) in zip(names, sums_L2.cpu().tolist())
        }

    @staticmethod
    def print(trainer: pl.Trainer, lines: list[str]) -> None:
        bar = trainer.progress_bar_callback
        for line in lines:
            if bar is not None:
                bar.print(line)  # above the progress bar, not through it
            else:
                print(line, flush=True)
