"""The app's word on a penalty's warm-up (Fishr's ``penalty_anneal_iters``, IRM's and V-REx's anneal
steps) that a run never gets past (issue 30): ``steps=20`` with Fishr's warm-up of 300 trains ERM and
records it as Fishr. Said once, before training, in the app's terms (``steps``, the records,
``+hparams.NAME``), in place of the callback's own warning in the Trainer's terms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from fishr_lightning.app.training.evaluation import record_steps
from fishr_lightning.app.training.hparams import registry
from fishr_lightning.head_penalty import HeadPenaltyCallback
from fishr_lightning.schedule import PenaltyScheduleWarning, warmup_outlasts_run


def warn_about_warmups(
    callbacks: Iterable[Callback],
    steps: int,
    checkpoint_freq: int,
    hparams: dict[str, Any],
    algorithm: str,
    dataset: str,
) -> list[str]:
    """One ``PenaltyScheduleWarning`` per penalty callback whose warm-up is at or past the run's last
    step, naming the hyperparameter, the steps and the records; the callback's own warning is then
    switched off (one warning per run). Returns the messages."""
    messages = []
    for callback in callbacks:
        if not isinstance(callback, HeadPenaltyCallback):
            continue
        schedule = callback.schedule
        if not warmup_outlasts_run(schedule.warmup_steps, steps):
            continue
        messages.append(warmup_message(callback, steps, checkpoint_freq, hparams, algorithm, dataset))
        rank_zero_warn(messages[-1], category=PenaltyScheduleWarning)
        callback.warn_if_warmup_outlasts_fit = False
    return messages


def warmup_message(
    callback: HeadPenaltyCallback,
    steps: int,
    checkpoint_freq: int,
    hparams: dict[str, Any],
    algorithm: str,
    dataset: str,
) -> str:
    schedule = callback.schedule
    warmup, last = schedule.warmup_steps, steps - 1
    # The registry's name when the callback's value is the hyperparameter's (configs/algorithm/*.yaml), else the
    # callback's own argument (a callback added with +callbacks=..., or its value set in the config).
    key = next(
        (
            name
            for name in registry(algorithm, dataset)
            if name.endswith("penalty_anneal_iters") and hparams.get(name) == warmup
        ),
        None,
    )
    option = f"hparams.{key}" if key else f"{type(callback).__name__}'s {callback.warmup_option}"
    what = "warm-up" if schedule.weight_before == 0 else "anneal step"
    records = record_steps(steps, checkpoint_freq)
    shown = ", ".join(map(str, records)) if len(records) <= 4 else f"{records[0]}, {records[1]}, ..., {records[-1]}"
    if warmup > last:
        when = f"throughout, and none of the records (steps {shown}) follows a step with the penalty at its weight"
    else:
        when = f"until the last step: only the last record (step {last}) follows a single step with it"
    lower = f"+hparams.{key}=N" if key else f"a {callback.warmup_option}"
    return (
        f"{algorithm}'s {what}, {option}={warmup}, is at or past the run's last step (steps={steps}: steps 0 to {last}): "
        f"{callback.name}/weight stays {schedule.weight_before:g} instead of {schedule.penalty_weight:g} {when}. "
        f"Train longer (steps={warmup + 2} or more) or lower the {what} ({lower} below {last})."
    )
