"""Weight averaging in the app (``averaging=swad|ema``): the callbacks, SWAD's valley loss on
DomainBed's step labels, and the averaged model's record beside DomainBed's (``averaged.jsonl``).

The DomainBed records (``results.jsonl``) stay those of the current model, so a sweep with averaging
still reads as DomainBed's; the averaged model is evaluated once, at the end of training, on every
split: in ``on_train_end``, after the averaging callbacks put the averaged weights in the module and
before Lightning's teardown moves it to the CPU, so on the training device, under the strategy and
the precision plugin, on every process (issue 18).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from fishr_lightning.app import AppError
from fishr_lightning.app.data.datamodule import DomainBedDataModule
from fishr_lightning.app.reporting.records import AVERAGED_FILE
from fishr_lightning.app.training.evaluation import (
    ACCURACY_SECTION,
    DomainBedEvaluation,
    log_accuracies,
    logged_accuracies,
    per_split_sums,
)
from fishr_lightning.averaging.batchnorm_update import BatchNormUpdate
from fishr_lightning.averaging.swad import SWADCallback


class SWADValleyLoss(Callback):
    """Closes SWAD's segment after DomainBed's step ``s`` when ``s % eval_every == 0`` (khanrc/swad's
    loop), with the current model's loss on the training domains' out splits: the mean over those
    domains of each split's mean cross-entropy (SWAD's ``tr_outloss``), every sample counted once
    across processes. ``augmentation``: the out splits through the training transform; khanrc/swad
    evaluates them with the plain one (``val_augment=False``), the app's default
    (``averaging.valley_augmentation=false``)."""

    def __init__(
        self, swad: SWADCallback, datamodule: DomainBedDataModule, eval_every: int, augmentation: bool = False
    ) -> None:
        self.swad, self.datamodule, self.eval_every = swad, datamodule, eval_every
        self.augmentation = augmentation

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1
        if step % self.eval_every == 0:
            self.swad.end_segment(trainer, self.training_domains_out_loss(trainer, pl_module, step))

    def training_domains_out_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> float:
        out_splits = [self.datamodule.eval_names.index(f"env{env}_out") for env in self.datamodule.train_envs]
        loader = self.datamodule.eval_loader(
            step, trainer.global_rank, trainer.world_size, splits=out_splits, augmentation=self.augmentation
        )
        sums_L2 = per_split_sums(
            trainer,
            pl_module,
            loader,
            len(self.datamodule.eval_names),
            lambda logits, y_N: F.cross_entropy(logits, y_N, reduction="none"),
        )
        sums_S2 = sums_L2[out_splits]
        return float((sums_S2[:, 0] / sums_S2[:, 1].clamp(min=1)).mean())


def averaging_callbacks(
    cfg: DictConfig, datamodule: DomainBedDataModule, evaluation: DomainBedEvaluation, run_dir: Path
) -> list[Callback]:
    """The callbacks of ``cfg.averaging`` (none, swad, ema), in the order they must run: before the
    evaluation callback, so that a checkpoint saved at a record holds the segment just closed; the
    averaged model's record last, once the averaged weights and their BatchNorm statistics are in."""
    averaging = cfg.averaging
    if averaging.name is None:
        return []
    bn_update_batches = averaging.get("bn_update_batches", 500)

    def bn_batches(trainer: pl.Trainer) -> DataLoader:
        # The steps after the last one, as khanrc/swad's update_bn reads its infinite training iterator on.
        return datamodule.training_batches(trainer.global_step, bn_update_batches)

    record = AveragedModelRecord(evaluation, cfg, run_dir)
    if averaging.name == "EMA":
        ema = EMAWeightAveraging(decay=averaging.decay, update_starting_at_step=averaging.update_starting_at_step)
        return [ema, BatchNormUpdate(bn_update_batches, batches=bn_batches), record]
    if averaging.name == "SWAD":
        check_swad_evaluations(cfg.steps, averaging.eval_every, averaging.n_converge)
        valley_augmentation = averaging.get("valley_augmentation", False)
        if not isinstance(valley_augmentation, bool):
            raise AppError(
                f"averaging.valley_augmentation={valley_augmentation}: false (khanrc/swad's val_augment=False, the "
                "plain transform) or true (the training augmentation, as DomainBed's evaluation)."
            )
        swad = SWADCallback(
            monitor=None,
            n_converge=averaging.n_converge,
            n_tolerance=averaging.n_tolerance,
            tolerance_ratio=averaging.tolerance_ratio,
            early_stop=averaging.early_stop,
            bn_update_batches=bn_update_batches,
            bn_batches=bn_batches,
        )
        return [swad, SWADValleyLoss(swad, datamodule, averaging.eval_every, valley_augmentation), record]
    raise AppError(
        f"averaging.name={averaging.name!r} is not one of the averaging configs: use averaging=none, swad or ema."
    )


def check_swad_evaluations(steps: int, eval_every: Any, n_converge: int) -> None:
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise AppError(
            f"averaging.eval_every={eval_every}: a number of steps between SWAD's evaluations, a positive integer."
        )
    evaluations = len(range(0, steps, eval_every))
    if evaluations < n_converge:
        raise AppError(
            f"averaging=swad evaluates the valley loss at steps 0, {eval_every}, ...: {evaluations} time(s) in "
            f"steps={steps}, fewer than the n_converge={n_converge} evaluations SWAD needs before its loss valley "
            f"can open. Train longer (steps >= {(n_converge - 1) * eval_every + 1}) or evaluate more often "
            f"(averaging.eval_every <= {max(1, (steps - 1) // max(1, n_converge - 1))})."
        )


def stopped_early(callbacks: list[Callback]) -> bool:
    return any(isinstance(cb, SWADCallback) and cb.summary is not None and cb.summary.stopped_early for cb in callbacks)


class AveragedModelRecord(Callback):
    """Evaluates the averaged weights (put in the module by the averaging callbacks before it) on
    every split at the end of training and writes the record to ``averaged.jsonl``, DomainBed's format
    with ``args.algorithm`` = e.g. ``"Fishr + SWAD"``, so that ``fishr-collect`` shows the averaged runs
    as their own rows and DomainBed's own collect_results.py, which reads only results.jsonl, sees the
    sweep unchanged. ``record`` holds it afterwards (in this process). Its accuracies go to the loggers at
    its step, as the records' (``acc/``), in a section of their own that names the average:
    ``acc_swad/env0_in``, ``acc_ema/val_training_domain``, ... (issue 30)."""

    def __init__(self, evaluation: DomainBedEvaluation, cfg: DictConfig, run_dir: Path) -> None:
        self.evaluation = evaluation
        self.algorithm = f"{cfg.algorithm.name} + {cfg.averaging.name}"
        self.averaging = OmegaConf.to_container(cfg.averaging, resolve=True)
        self.path = run_dir / AVERAGED_FILE
        self.record: dict[str, Any] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not after trainer.fit: Strategy.teardown has then moved the module to the CPU (issue 18).
        step = trainer.global_step - 1  # DomainBed's label of the last update the averaged weights saw
        record: dict[str, Any] = {"step": step, "averaging": self.averaging["name"]}
        record.update(self.evaluation.accuracies(trainer, pl_module, step))
        swad = next((cb for cb in trainer.callbacks if isinstance(cb, SWADCallback)), None)
        if swad is not None and swad.summary is not None:
            record["swad"] = swad.summary.as_record()
        batchnorm = next((cb for cb in trainer.callbacks if isinstance(cb, BatchNormUpdate)), None)
        if batchnorm is not None:
            record["batchnorm_batches"] = batchnorm.batches_used
        args = {**self.evaluation.writer.args, "algorithm": self.algorithm, "averaging": self.averaging}
        self.record = {**record, "hparams": self.evaluation.writer.hparams, "args": args}
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.record, sort_keys=True) + "\n")
            section = f"{ACCURACY_SECTION}_{self.averaging['name'].lower()}"
            log_accuracies(trainer, logged_accuracies(record, self.evaluation.datamodule.train_envs, section), step)
