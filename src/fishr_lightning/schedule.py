"""Fishr's schedule, for any training loop (pure torch): λ_t after warm-up, and the optimizer
reset when the penalty switches on (DomainBed re-creates Adam there)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fishr_lightning.functional import FishrInputError


def penalty_weight_at_step(
    step: int, penalty_weight: float, warmup_steps: int, ramp_steps: int = 0, weight_before: float = 0.0
) -> float:
    """``λ_t``: ``weight_before`` (Fishr: 0) for ``t < warmup_steps``, then ``penalty_weight``, reached
    linearly from ``weight_before`` over ``ramp_steps`` optimizer steps when ``ramp_steps > 0``.

    DomainBed's IRM and V-REx weigh their penalty 1.0, not 0, before annealing: ``weight_before=1.0``.
    """
    if step < warmup_steps:
        return weight_before
    if ramp_steps > 0:
        return weight_before + (penalty_weight - weight_before) * min(1.0, (step - warmup_steps + 1) / ramp_steps)
    return penalty_weight


class PenaltyScheduleWarning(UserWarning):
    """A warm-up (an anneal step) that the run never gets past: the penalty never reaches its weight (issue 30)."""


def warmup_outlasts_run(warmup_steps: int, run_steps: float | None) -> bool:
    """Whether a warm-up of ``warmup_steps`` ends at or after the last of ``run_steps`` optimizer steps
    (steps ``0 .. run_steps - 1``): the penalty then weighs at most that last step. ``run_steps`` ``None``
    or infinite (no step limit): ``False``."""
    if run_steps is None or math.isinf(run_steps) or run_steps <= 0:
        return False
    return warmup_steps > 0 and warmup_steps >= run_steps - 1


def warmup_outlasts_run_message(
    owner: str, option: str, schedule: FishrSchedule, run_steps: int, weight_name: str, run_length: str
) -> str:
    """The warning for ``warmup_outlasts_run``: which option, the step values, and what to do.

    Args:
        owner: who has the warm-up (``"FishrCallback"``).
        option: its argument's name (``"warmup_steps"``, ``"irm_penalty_anneal_iters"``).
        schedule: the schedule (its warm-up, its weights before and after).
        run_steps: the run's optimizer steps.
        weight_name: where λ_t is logged (``"fishr/weight"``).
        run_length: how the user sets the run's length (``"max_steps"``, ``"steps"``).
    """
    warmup, last = schedule.warmup_steps, run_steps - 1
    when = "throughout" if warmup > last else f"until that last step ({last})"
    return (
        f"{owner}'s {option}={warmup} is at or past the last optimizer step of this run ({run_steps} steps: 0 to "
        f"{last}), so the penalty never gets its weight: {weight_name} stays {schedule.weight_before:g} "
        f"{when} instead of {schedule.penalty_weight:g}. Lower {option} below {last}, or train for more than "
        f"{warmup + 1} steps ({run_length}={warmup + 2} or more)."
    )


def reset_optimizer_states(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Forget the optimizers' running statistics, as DomainBed's re-creation of Adam does when the
    penalty switches on ("Adam may not like the sharp jump in gradient magnitudes")."""
    for optimizer in optimizers:
        optimizer.state.clear()


class FishrSchedule:
    """λ_t from the optimizer step, and the optimizer reset once, at the first step ``≥ warmup_steps``.

    Every head penalty's schedule (``HeadPenaltyCallback``), not only Fishr's.

    Args:
        penalty_weight: λ once warm-up is over.
        warmup_steps: optimizer steps with λ = ``weight_before``.
        ramp_steps: when > 0, λ grows linearly to ``penalty_weight`` over this many steps after warm-up.
        reset_optimizer: clear the optimizers' state when the penalty switches on.
        weight_before: λ during warm-up (default 0, Fishr's; DomainBed's IRM and V-REx use 1.0).

    In a plain loop, call ``maybe_reset(step, optimizers)`` before each step's forward and multiply
    the penalty by ``weight(step)``. ``step`` counts optimizer steps; it may advance by more than one
    per batch (several optimizers, manual optimization): the reset still fires once.
    """

    def __init__(
        self,
        penalty_weight: float,
        warmup_steps: int,
        ramp_steps: int = 0,
        reset_optimizer: bool = True,
        weight_before: float = 0.0,
    ) -> None:
        if penalty_weight < 0 or warmup_steps < 0 or ramp_steps < 0 or weight_before < 0:
            raise FishrInputError(
                f"penalty_weight, warmup_steps, penalty_ramp_steps and the weight before warm-up must be >= 0, got "
                f"{penalty_weight}, {warmup_steps}, {ramp_steps}, {weight_before}."
            )
        self.penalty_weight = penalty_weight
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.reset_optimizer = reset_optimizer
        self.weight_before = weight_before
        self.last_reset_step: int | None = None

    def weight(self, step: int) -> float:
        """λ at optimizer step ``step``."""
        return penalty_weight_at_step(step, self.penalty_weight, self.warmup_steps, self.ramp_steps, self.weight_before)

    def maybe_reset(self, step: int, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Reset at the first call with ``step ≥ warmup_steps`` (> 0), once per run: later
        micro-batches of that step (gradient accumulation) and restarts do not reset again."""
        due = self.reset_optimizer and self.warmup_steps > 0 and step >= self.warmup_steps
        if due and self.last_reset_step is None:
            reset_optimizer_states(optimizers)
            self.last_reset_step = step
            return True
        return False

    def reset(self) -> None:
        """A new run: the optimizer reset is due again."""
        self.last_reset_step = None

    def state_dict(self) -> dict[str, int | None]:
        return {"last_reset_step": self.last_reset_step}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self.last_reset_step = state.get("last_reset_step")
