"""DomainBed's results format: ``results.jsonl`` in the run directory, one JSON record per evaluation,
so DomainBed's ``collect_results.py`` and model-selection code read our runs.

A record holds ``step`` (optimizer steps done), ``epoch``, ``env{i}_in_acc`` and ``env{i}_out_acc`` for
every domain (test domains included), the loss terms averaged over the steps since the previous
record (``loss``: the objective, penalty included; ``nll``; ``penalty`` when Fishr runs),
``step_time``, ``mem_gb``, ``hparams`` and ``args`` (``dataset``, ``algorithm``, ``test_envs``,
``hparams_seed``, ``trial_seed``, ...).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fishr_lightning.app.reporting.records import RESULTS_FILE, read_records

# Metrics logged by other callbacks that DomainBed records under another name.
LOGGED_LOSS_TERMS = {"fishr/penalty": "penalty"}


class DomainBedResults(Callback):
    """Appends a DomainBed record to ``run_dir/results.jsonl`` after every evaluation, and prints it.

    Args:
        run_dir: the run directory.
        hparams: the run's hyperparameters (recorded as ``hparams``).
        args: the run's arguments (recorded as ``args``).
        steps_per_epoch: to express steps in epochs, as DomainBed.
        num_domains: the dataset's domains; records hold the accuracies of all of them.
    """

    def __init__(
        self,
        run_dir: str | Path,
        hparams: dict[str, Any],
        args: dict[str, Any],
        steps_per_epoch: float,
        num_domains: int,
    ) -> None:
        self.path = Path(run_dir) / RESULTS_FILE
        self.hparams = hparams
        self.args = args
        self.steps_per_epoch = steps_per_epoch
        self.num_domains = num_domains
        self.step_values: dict[str, list[float]] = defaultdict(list)
        self.recorded_steps: set[int] = set()
        self._collected_logged_at_step = -1
        self._step_started = 0.0
        self._printed_header = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run drops what an interrupted run recorded after its checkpoint: those steps
        # are trained again, and their records written again.
        records = [r for r in read_records(self.path.parent) if r["step"] <= trainer.global_step]
        if trainer.is_global_zero and self.path.exists():
            self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self.recorded_steps = {r["step"] for r in records}
        self._collected_logged_at_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._collect_logged_loss_terms(trainer)
        self._step_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_values["step_time"].append(time.perf_counter() - self._step_started)
        if isinstance(outputs, dict):
            for name in ("loss", "nll"):
                if name in outputs:
                    self.step_values[name].append(float(outputs[name]))

    def _collect_logged_loss_terms(self, trainer: pl.Trainer) -> None:
        """Metrics logged at step ``t`` reach ``callback_metrics`` after ``on_train_batch_end``: they
        are collected once per completed step, before the next step or the evaluation."""
        if trainer.global_step == self._collected_logged_at_step:
            return
        self._collected_logged_at_step = trainer.global_step
        for logged_name, record_name in LOGGED_LOSS_TERMS.items():
            if logged_name in trainer.callback_metrics:
                self.step_values[record_name].append(float(trainer.callback_metrics[logged_name]))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_logged_loss_terms(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step in self.recorded_steps:
            return
        record: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch}
        record.update({name: float(np.mean(values)) for name, values in self.step_values.items()})
        for env in range(self.num_domains):
            for split in ("in", "out"):
                name = f"env{env}_{split}_acc"
                record[name] = float(trainer.callback_metrics[name]) if name in trainer.callback_metrics else None
        record["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        self.step_values.clear()
        self.recorded_steps.add(step)
        if trainer.is_global_zero:
            self._print_row(trainer, record)
            record.update({"hparams": self.hparams, "args": self.args})
            with self.path.open("a") as results_file:
                results_file.write(json.dumps(record, sort_keys=True) + "\n")

    def _print_row(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        """DomainBed's console table: a header, then one row per evaluation."""
        keys = sorted(record)
        lines = []
        if not self._printed_header:
            lines.append("  ".join(f"{key[:12]:<12}" for key in keys))
            self._printed_header = True
        lines.append("  ".join(format_cell(record[key]) for key in keys))
        bar = trainer.progress_bar_callback
        for line in lines:
            if bar is not None:
                bar.print(line)  # above the progress bar, not through it
            else:
                print(line)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:<12.4f}"
    return f"{value!s:<12}"[:12]


class EvaluateAtLastStep(Callback):
    """Ends training after ``steps`` optimizer steps by Lightning's early-stop path, which evaluates
    once more: DomainBed records the last step whether or not it is a multiple of ``checkpoint_freq``."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
