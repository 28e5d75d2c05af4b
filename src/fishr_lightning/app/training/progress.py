"""Progress for log files: when stdout is not a terminal (``python train.py > log``, a SLURM job),
Lightning's progress bar writes a frame per refresh; this callback writes one line every ``every``
steps instead."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from fishr_lightning.app.training.evaluation import step_losses


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class ProgressLines(Callback):
    """Every ``every`` steps (and at the last), one line on rank 0:
    ``step 99/5000  loss 0.6931  nll 0.6931  penalty 0.0012  12.3 steps/s  ETA 6m40s``.

    Args:
        every: steps between lines (DomainBed's step labels: the line of step ``s`` follows ``s + 1`` updates).
        steps: updates in all.
    """

    def __init__(self, every: int, steps: int) -> None:
        self.every = every
        self.steps = steps
        self._started_at = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started_at = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = trainer.global_step
        if not trainer.is_global_zero or (done % self.every and done != self.steps):
            return
        parts = [f"step {done - 1}/{self.steps - 1}"]
        for name, value in step_losses(outputs, trainer).items():
            parts.append(f"{name} {value:.4g}" if "penalty" in name else f"{name} {value:.4f}")
        elapsed = time.perf_counter() - self._started_at
        rate = (done - self._first_step) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts += [f"{rate:.1f} steps/s", f"ETA {format_duration((self.steps - done) / rate)}"]
        print("  ".join(parts), flush=True)
