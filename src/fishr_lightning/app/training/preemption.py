"""Preemption (issue 19): SLURM sends SIGTERM before it kills a job (and SIGUSR1/SIGUSR2 where a job
asks for a warning before its time limit, as submitit and Lightning's ``SLURMEnvironment`` do).

The run must then save the step it reached, exit non-zero without writing ``done`` (so that the
scheduler and submitit know it did not finish) and, where a launcher can requeue it, be requeued;
the requeued run resumes from its checkpoint (``ckpt_path: auto``). Lightning's own SIGTERM handling
ends ``fit`` with ``SIGTERMException``, a ``SystemExit`` with status 0, and saves nothing.

``Preemption`` takes the three signals over while the trainer runs: the handler only notes the
signal (and passes it to the processes Lightning launched); at the end of the training step, once
every callback has run (the step's record included), the run saves ``checkpoints/last.ckpt`` and
raises ``Preempted``. Its ``hand_over`` then does what the launcher would have done with the signal:
submitit's checkpoint-and-requeue (Hydra's submitit launcher gives it the ``checkpoint()`` that
re-submits the same job), else exit with status 128 + the signal's number, as a process the signal
had killed. A SLURM partition that preempts by requeueing starts the same command again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from fishr_lightning.app.data.loader_workers import PREEMPTION_SIGNALS


class Preempted(BaseException):
    """The run was asked to stop by ``signum`` and saved ``checkpoint`` at ``step`` updates.

    A ``BaseException``, as ``KeyboardInterrupt``: after the last update it is raised from the signal handler,
    at any bytecode, possibly while a library's ``except Exception`` block runs (a DDP rank unwinding a
    collective whose peer has just stopped), which must not swallow it (issue 25)."""

    def __init__(
        self, signum: int, step: int, checkpoint: Path | None, requeue: Any = None, slurm_job: str | None = None
    ) -> None:
        self.signum, self.step, self.checkpoint, self.requeue = signum, step, checkpoint, requeue
        self.slurm_job = slurm_job  # requeue this SLURM job (Lightning's auto-requeue), from rank 0
        name = signal.Signals(signum).name
        saved = (
            f"saved {checkpoint}"
            if checkpoint is not None
            else "during the work after the last update; it resumes from the last record's checkpoint"
        )
        super().__init__(
            f"{name} received: the run stopped after {step} update{'' if step == 1 else 's'} ({saved}); it is not finished (no 'done'). "
            "The same command resumes it from there (ckpt_path: auto)."
        )

    def hand_over(self) -> NoReturn:
        """Requeue through the launcher that started the run (submitit), else exit with 128 + signum."""
        if self.requeue is not None:
            self.requeue(self.signum, None)  # submitit: checkpoint() re-submits the job, then exits
        elif self.slurm_job is not None:
            # What Lightning's SLURM handler (auto_requeue, whose signal Preemption took over) does.
            result = subprocess.run(["scontrol", "requeue", self.slurm_job], capture_output=True, text=True)
            outcome = "requeued" if result.returncode == 0 else f"not requeued ({result.stderr.strip()})"
            print(f"fishr-train: SLURM job {self.slurm_job} {outcome}.", file=sys.stderr, flush=True)
        sys.exit(128 + self.signum)


def slurm_job_to_requeue(trainer: pl.Trainer, signum: int) -> str | None:
    """The SLURM job to requeue on ``signum``, as Lightning's ``SLURMEnvironment(auto_requeue=True)`` would
    (its ``requeue_signal``, SIGUSR1 by default; ``sbatch --signal=USR1@90``), from global rank 0 only."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if not isinstance(environment, SLURMEnvironment):
        if not SLURMEnvironment.detect():
            return None
        environment = SLURMEnvironment()  # the single-device strategies hold none: Lightning's defaults
    if not environment.auto_requeue or signum != environment.requeue_signal or trainer.global_rank != 0:
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")


def submitit_requeue_handler() -> Any:
    """Submitit's checkpoint-and-requeue handler when this process is a submitit job, else ``None``.

    Submitit binds it to ``SUBMITIT_PREEMPT_SIGNAL`` (SIGUSR2) and bypasses SIGTERM; the app requeues
    on any of the three signals, so that a job preempted with SIGTERM is requeued too."""
    if "SUBMITIT_FOLDER" not in os.environ:  # submitit's process_job sets it
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    handler = signal.getsignal(getattr(signal, f"SIG{name}", signal.SIGUSR2))
    return handler if callable(handler) and getattr(handler, "__name__", "") == "checkpoint_and_try_requeue" else None


class Preemption(Callback):
    """Saves ``resume_checkpoint`` and stops the run at the end of the step during which a preemption
    signal (``SIGTERM``, ``SIGUSR1``, ``SIGUSR2``) arrived, by raising ``Preempted``.

    Put it after every other callback, so that the step's record is written first. Under DDP every
    process stops at the same step (the decision is reduced over processes at each step).

    Args:
        resume_checkpoint: where the checkpoint of the step reached goes (the app's ``checkpoints/last.ckpt``).
    """

    def __init__(self, resume_checkpoint: Path | None) -> None:
        self.resume_checkpoint = resume_checkpoint
        self.received: int | None = None
        self._trainer: pl.Trainer | None = None
        self._replaced: dict[int, Any] = {}
        self._training_over = False  # the last update is done: a signal now stops the run at once
        # Before Lightning registers its own handlers: the launcher's (submitit's) or the defaults.
        self.requeue = submitit_requeue_handler()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first and launcher is not None and hasattr(launcher, "kill"):
            # The ranks Lightning started in subprocesses get it too (as Lightning does), before this one stops
            # below (issue 25: after the last update it raised first, and they waited in a collective for it).
            launcher.kill(signum)
        if self._training_over and first:
            # After the last update no step end comes to act on it: stop now (SWAD's BatchNorm update or the
            # averaged evaluation can take minutes). Nothing is saved: a checkpoint past the last update would
            # skip that work on resume; the last record's checkpoint resumes the run.
            trainer = self._trainer
            step = trainer.global_step if trainer is not None else 0
            slurm_job = slurm_job_to_requeue(trainer, signum) if trainer is not None else None
            raise Preempted(signum, step, None, self.requeue, slurm_job)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's _SignalConnector registered its handlers (it restores what it found at the end).
        self._trainer = trainer
        self._training_over = False
        if trainer.received_sigterm:  # between Lightning's registration and now: Lightning's handler noted it
            self.received = signal.SIGTERM
        for signum in PREEMPTION_SIGNALS:
            self._replaced[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        last_update = 0 < trainer.max_steps <= trainer.global_step
        if not stop:
            self._training_over = last_update
            if last_update and self.received is not None:
                # Noted during the reduction above, after this rank's vote (issue 25): the others, ahead, treat
                # the signal as one after the last update (SLURM signals every rank; rank 0 passes it on), so
                # this one stops as _note does from now on, rather than wait for them in the final work.
                raise Preempted(
                    self.received, trainer.global_step, None, self.requeue, slurm_job_to_requeue(trainer, self.received)
                )
            return
        checkpoint = None if last_update else self.resume_checkpoint  # see _note: none past the last update
        if checkpoint is not None:
            trainer.save_checkpoint(checkpoint, weights_only=False)  # every rank: ends in a barrier
        signum = self.received or signal.SIGTERM
        raise Preempted(signum, trainer.global_step, checkpoint, self.requeue, slurm_job_to_requeue(trainer, signum))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's _SignalConnector already restored the handlers it found (also after an exception);
        # put back only those that are still this callback's.
        for signum, handler in self._replaced.items():
            if signal.getsignal(signum) == self._note:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._replaced = {}
        self._trainer = None
        self._training_over = False
