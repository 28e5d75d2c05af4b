"""``HeadPenaltyCallback``: what every penalty on a classifier's final linear layer shares.

Fishr, and DomainBed's IRM, V-REx, CORAL, MMD, GroupDRO and SD (issue 21), each need only what the
head sees in one training step: its input features, its logits, the targets and the domain ids.
This base captures them, adds the subclass's penalty to the loss before Lightning's single
backward, and owns the schedule, the logging and the checkpoint state; a subclass is its formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fishr_lightning import heads
from fishr_lightning.functional import FishrInputError
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.schedule import (
    FishrSchedule,
    PenaltyScheduleWarning,
    warmup_outlasts_run,
    warmup_outlasts_run_message,
)


class _Absent:
    """Marks a module with no ``training_step`` instance attribute: its class's method runs."""

    def __repr__(self) -> str:
        return "<class's training_step>"


_ABSENT = _Absent()


def fit_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps this fit will run (``max_steps``, or the epochs' batches), ``None`` without a
    limit. Read once the training dataloader is loaded (``on_train_start``), so nothing is loaded early."""
    try:
        steps = trainer.estimated_stepping_batches
    except MisconfigurationException:  # accumulation that changes between epochs: max_steps alone
        steps = trainer.max_steps
    return None if steps is None or steps == float("inf") or steps < 0 else int(steps)


# The entry of a dict-returning ``training_step``'s output that holds the loss DomainBed's ``update()``
# returns as ``loss`` (issue 25), where it differs from the objective that is back-propagated: CORAL, MMD
# and SD return the cross-entropy alone. Set by the first callback whose penalty DomainBed leaves out of
# it, detached; records (the app's ``results.jsonl``) read it in place of ``loss`` when present.
DOMAINBED_LOSS_KEY = "domainbed_loss"


class _PenalisedTrainingStep:
    """The instance attribute ``training_step`` a penalty callback sets on the module during a fit.

    An object rather than a closure (issue 18, item 8): a copy of the module taken mid-fit
    (``copy.deepcopy``, as Lightning's ``WeightAveraging`` does, or ``pickle``) gets what was there
    before the wrapper, never a wrapper bound to the original module or to a copied callback (see
    ``__reduce__``). Several callbacks chain: each one's ``inner`` is what it found, possibly another
    wrapper.
    """

    def __init__(self, callback: HeadPenaltyCallback, module: pl.LightningModule, inner: Any) -> None:
        self.callback, self.module, self.inner = callback, module, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.callback._penalised_step(self.module, self.call_inner, args, kwargs)

    def call_inner(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is _ABSENT:
            return type(self.module).training_step(self.module, *args, **kwargs)
        return self.inner(*args, **kwargs)

    @property
    def __wrapped__(self) -> Any:
        """The innermost ``training_step`` (Lightning's ``is_overridden`` and ``inspect.signature`` read it)."""
        inner = self.inner
        while isinstance(inner, _PenalisedTrainingStep):
            inner = inner.inner
        return type(self.module).training_step if inner is _ABSENT else inner

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # deepcopy and pickle rebuild the copy's attribute from this: the wrapped attribute itself (a
        # chain collapses, each wrapper reducing to its inner), or, when the module had none, the
        # class's method bound to the copy (``getattr`` runs while the copy's __dict__ is still being
        # filled, so it finds the class's ``training_step``). Builtins only: unpickling needs no import.
        if self.inner is _ABSENT:
            return getattr, (self.module, "training_step")
        return _identity, (self.inner,)


def _identity(value: Any) -> Any:
    return value


class _HeadCapture:
    """The head's forward hook: records ``(features_ND, logits_NC)`` for the callback's current step.

    Registered only while the fit's ``training_step`` runs, so a copy of the module taken between
    steps has no hook at all; a copy taken inside a step gets a hook that records nothing.
    """

    def __init__(self, captured: list[tuple[Tensor, Tensor]] | None) -> None:
        self.captured = captured

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
        if self.captured is not None:
            self.captured.append((args[0] if args else kwargs["input"], output))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _HeadCapture, (None,)


class HeadPenaltyCallback(Callback):
    r"""Base of the callbacks that add a penalty computed from the final ``nn.Linear`` (the *head*).

    During each training step of a fit it records the head's input features ``[N, D]`` and logits
    ``[N, C]`` and folds ``λ_t · penalty`` into the loss that ``training_step`` returns, before
    Lightning's single backward (callbacks cannot change the loss otherwise, Lightning PR #9770).

    **The contract for subclasses.** Set the class attribute ``name`` (the log prefix, e.g.
    ``"fishr"``), call ``super().__init__(schedule=..., head=..., targets_and_domains=..., name=...)``
    and implement:

    - ``compute_penalty(features_ND, logits_NC, targets_N, domains_N, weight, trainer) -> Tensor``:
      the raw penalty of this step, a scalar. ``weight`` is ``λ_t``; when it is 0 the result is
      only logged, so it may be computed without a graph (detached). It is called exactly once per
      training step (per micro-batch under gradient accumulation), so running state (an EMA,
      GroupDRO's ``q``) advances there.

    and, when the penalty has state or needs the trainer:

    - ``reset_state()``: forget the state at the start of each fit (a checkpoint's state is loaded
      after it when the fit resumes);
    - ``state_dict()`` / ``load_state_dict(state)``: extend the base's (call ``super()``) so that a
      resumed run continues the uninterrupted one;
    - ``configure_penalty(trainer, pl_module)``: once per fit, after the head is resolved (its module
      is ``self.head_module``), before the first training batch: cross-rank reductions, BackPACK;
    - ``combine(loss, penalty, weight) -> Tensor``: how the penalty joins the module's loss; the
      default is ``loss + weight · penalty`` (and ``loss`` itself while ``weight`` is 0), which is
      DomainBed's IRM and V-REx too (issue 25: it is the IRM paper's Colored MNIST script, not
      DomainBed, that divides the sum by ``weight`` once ``weight > 1``). Override it for a penalty
      that is not added, e.g. GroupDRO (whose robust loss replaces the module's).

    A subclass that overrides a Lightning hook (``setup``, ``on_fit_start``, ``on_train_start``,
    ``on_train_batch_start``, ``teardown``, ``on_exception``) calls ``super()``. The base does nothing
    across processes: under DDP a subclass reduces its own statistics in ``compute_penalty``
    (``FishrCallback`` all-reduces its per-domain moments, set up in ``configure_penalty``) or says at
    fit start that it cannot.

    **What the base guarantees**, the same for every penalty:

    - *Head*: resolved at ``on_fit_start``, after ``configure_model`` (so heads created there are
      found), from ``head`` (an attribute path such as ``"model.fc"``) or the default names
      (``classifier``, ``fc``, ``head``, ``head.fc``, ``linear``, top level or under
      ``model``/``network``, else the only ``nn.Linear``). The head must run exactly once per step.
    - *Batches*: ``(x, y, domain)`` tuples or mappings with keys ``x``, ``y``, ``domain``, or any
      layout through ``targets_and_domains=lambda batch: (targets, domain_ids)``.
    - *Schedule*: ``λ_t`` from ``trainer.global_step`` (``schedule.weight``), with the optimizers'
      state cleared once at the first step ``≥ warmup_steps`` when the schedule says so (DomainBed
      re-creates Adam there); ``weight_before`` sets λ during warm-up (IRM and V-REx: 1.0).
    - *Only the fit's training steps*: a ``validation_step`` (or test or predict step) calling
      ``self.training_step`` gets the plain output; nothing is computed, logged or updated.
    - *Logging*: ``<name>/penalty`` (the raw penalty) and ``<name>/weight`` (λ_t) at every step; the
      last raw penalty is also ``last_penalty``.
    - *DomainBed's returned loss*: a subclass whose penalty DomainBed's ``update()`` leaves out of the
      ``loss`` it returns (``penalty_in_domainbed_loss = False``: CORAL, MMD, SD) adds
      ``DOMAINBED_LOSS_KEY`` to a dict output: the loss without its weighted penalty, to which the
      later callbacks' terms are added; the objective under ``loss`` is unchanged.
    - *Several penalties*: any number of these callbacks may share a Trainer (and a head), each with
      its own schedule, logs and checkpoint state, as long as their names differ; their
      penalties fold into the loss in the order of the callbacks list (the first listed innermost).
    - *Lifecycle*: each fit starts afresh (``reset_state``, the schedule's reset) unless it resumes
      from a checkpoint; whatever ends the fit (success, an exception, ``KeyboardInterrupt``) the
      module is left as it was found. During the fit, ``training_step`` is an instance attribute
      that survives ``copy.deepcopy`` and ``pickle``: a copy gets the module's own ``training_step``
      and no hook (Lightning's ``WeightAveraging`` copies the module during the fit).
    - *A warm-up longer than the fit*: when ``schedule.warmup_steps`` is at or past the fit's last
      optimizer step (from ``max_steps``, or the epochs' batches; nothing without a limit), one
      ``PenaltyScheduleWarning`` at ``on_train_start`` names the option (the class's
      ``warmup_option``) and the steps (issue 30); ``warn_if_warmup_outlasts_fit = False`` silences it.
    - *Checks*: manual optimization, features cut off from a trainable backbone while λ > 0, a
      penalty without a graph while λ > 0, a head that runs more or less than once per step, an
      output without a loss: each raises
      ``FishrInputError`` saying what to do.

    Args:
        schedule: λ_t and the optimizer reset (``FishrSchedule``).
        head: attribute path of the final ``nn.Linear``; ``None`` finds it by its usual names.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: log prefix, and what tells two callbacks of one class apart in checkpoints; default
            the class's ``name``.
    """

    name: str = "penalty"
    # Whether DomainBed's update() counts the weighted penalty in the ``loss`` it returns (IRM, V-REx, Fishr:
    # the objective) or returns the cross-entropy alone (CORAL, MMD, SD); see ``DOMAINBED_LOSS_KEY``.
    penalty_in_domainbed_loss: ClassVar[bool] = True
    manual_optimization_hint: ClassVar[str] = "Add the penalty to the loss you pass to self.manual_backward yourself."
    # The constructor argument that sets ``schedule.warmup_steps``, named in the warm-up warning.
    warmup_option: ClassVar[str] = "warmup_steps"
    # The app sets it to False on a callback whose warm-up it reported in its own terms (issue 30).
    warn_if_warmup_outlasts_fit: bool = True

    def __init__(
        self,
        *,
        schedule: FishrSchedule,
        head: str | None = None,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        self.schedule = schedule
        self.head = head
        self.requested_head = head
        # The default reader names this callback in its error (issue 25).
        self.targets_and_domains = targets_and_domains or partial(
            heads.default_targets_and_domains, owner=type(self).__name__
        )
        self._head_module: nn.Linear | None = None
        self._captured: list[tuple[Tensor, Tensor]] = []
        self._module: pl.LightningModule | None = None
        self._wrapper: _PenalisedTrainingStep | None = None
        self._last_penalty: Tensor | None = None

    # -- what subclasses implement --------------------------------------------------------------

    def compute_penalty(
        self,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets_N: Tensor,
        domains_N: Tensor,
        weight: float,
        trainer: pl.Trainer,
    ) -> Tensor:
        """This step's raw penalty (a scalar); see the class's contract."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_penalty(...).")

    def reset_state(self) -> None:
        """Forget the penalty's own state at the start of a fit (nothing by default)."""

    def configure_penalty(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per fit, with the head resolved, before the first training batch (nothing by default)."""

    def combine(self, loss: Tensor, penalty: Tensor, weight: float) -> Tensor:
        """The loss with the penalty: ``loss + weight · penalty``, or ``loss`` itself while ``weight`` is 0."""
        return loss + weight * penalty if weight > 0 else loss

    # -- public state ---------------------------------------------------------------------------

    @property
    def head_module(self) -> nn.Linear | None:
        """The head ``nn.Linear``, once a fit has resolved it."""
        return self._head_module

    @property
    def last_penalty(self) -> float | None:
        """The raw penalty of the last training step (``None`` before the first step of a fit)."""
        return None if self._last_penalty is None else float(self._last_penalty)

    @property
    def state_key(self) -> str:
        # The class's name when the callback has its class's default name, as checkpoints have always
        # keyed it; the name too otherwise, so that several callbacks of one class each keep their state.
        if self.name == type(self).name:
            return super().state_key
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"last_reset_step": self.schedule.last_reset_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.last_reset_step = state_dict.get("last_reset_step")

    # -- set-up and tear-down -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_setup(trainer, pl_module)
        # A new fit starts afresh; a checkpoint's state is loaded after setup.
        self.reset_state()
        self.schedule.reset()
        self._last_penalty = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model (heads created there exist now) and before the first batch (issue 18, item 8).
        self.head, self._head_module = heads.resolve_head(pl_module, self.requested_head, type(self).__name__)
        self.configure_penalty(trainer, pl_module)
        self._install(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not at on_fit_start: the training dataloader is loaded, so the fit's length costs nothing.
        run_steps = fit_steps(trainer)
        if self.warn_if_warmup_outlasts_fit and warmup_outlasts_run(self.schedule.warmup_steps, run_steps):
            message = warmup_outlasts_run_message(
                type(self).__name__, self.warmup_option, self.schedule, run_steps, f"{self.name}/weight", "max_steps"
            )
            rank_zero_warn(message, category=PenaltyScheduleWarning)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, when a fit raises (KeyboardInterrupt included).
        self._restore()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.schedule.maybe_reset(trainer.global_step, trainer.optimizers)

    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kind = type(self).__name__
        if not pl_module.automatic_optimization:
            raise FishrInputError(
                f"{kind} adds its penalty to the loss returned by training_step, which manual optimization "
                f"ignores. {self.manual_optimization_hint}"
            )
        same_name = [cb for cb in trainer.callbacks if isinstance(cb, HeadPenaltyCallback) and cb.name == self.name]
        if len(same_name) > 1:
            raise FishrInputError(
                f"{len(same_name)} penalty callbacks on this Trainer are named {self.name!r} "
                f"({', '.join(type(cb).__name__ for cb in same_name)}): their logs ({self.name}/penalty) and "
                "checkpoint state would collide. Give each its own name=..."
            )
        stale = vars(pl_module).get("training_step")
        if isinstance(stale, _PenalisedTrainingStep):  # this fit's wrappers are installed at on_fit_start
            owner = stale.callback
            raise FishrInputError(
                f"{type(pl_module).__name__}.training_step is already wrapped by another {type(owner).__name__} "
                f"({owner!r}), still attached from a fit that did not finish. Nesting them would add the "
                "penalty twice: call that callback's teardown (or build a fresh module) before fitting again."
            )

    def _install(self, pl_module: pl.LightningModule) -> None:
        """Wrap the module's ``training_step`` (over whatever is there, possibly another penalty's wrapper)."""
        self._module = pl_module
        self._wrapper = _PenalisedTrainingStep(self, pl_module, vars(pl_module).get("training_step", _ABSENT))
        pl_module.training_step = self._wrapper  # type: ignore[method-assign]

    def _restore(self) -> None:
        """Leave the module as it was found: the attribute our wrapper replaced (or its absence) back.

        Idempotent. Wrapped by another penalty callback since, ours is taken out of the chain (the
        callbacks' teardowns run in any order); an attribute someone else set over ours is left alone.
        """
        module, wrapper = self._module, self._wrapper
        self._module = self._wrapper = None
        self._captured.clear()
        if module is None or wrapper is None:
            return
        current = vars(module).get("training_step")
        if current is wrapper:
            if wrapper.inner is _ABSENT:
                del module.training_step  # the class's method is back
            else:
                module.training_step = wrapper.inner  # type: ignore[method-assign]
            return
        while isinstance(current, _PenalisedTrainingStep):
            if current.inner is wrapper:
                current.inner = wrapper.inner
                return
            current = current.inner

    # -- per step -------------------------------------------------------------------------------

    def _penalised_step(self, pl_module: pl.LightningModule, inner: Any, args: tuple, kwargs: dict) -> Any:
        trainer = pl_module.trainer
        if not (trainer.state.fn == TrainerFn.FITTING and trainer.training):
            return inner(*args, **kwargs)  # validation/test/predict calls pass through
        self._captured.clear()
        handle = self._head_module.register_forward_hook(_HeadCapture(self._captured), with_kwargs=True)
        try:
            try:
                output = inner(*args, **kwargs)
            finally:
                handle.remove()
            if output is None:  # the module skipped this batch
                return None
            batch = args[0] if args else kwargs["batch"]
            return self._add_penalty(pl_module, output, batch)
        finally:  # nothing captured outlives the step
            self._captured.clear()

    def _add_penalty(self, pl_module: pl.LightningModule, output: Any, batch: Any) -> Any:
        kind = type(self).__name__
        if len(self._captured) != 1:
            raise FishrInputError(
                f"The {kind} head {self.head!r} ran {len(self._captured)} times in one training_step; "
                f"{kind} needs exactly one forward of the head per step, on the whole batch. "
                f"Name the right head with head=...{self._several_forwards_hint()}"
            )
        features_ND, logits_NC = self._captured.pop()
        targets_N, domains_N = self.targets_and_domains(batch)
        trainer = pl_module.trainer
        weight = self.schedule.weight(trainer.global_step)
        if weight > 0 and logits_NC.requires_grad:  # logits without a graph: the subclass says so
            self._check_features_carry_the_graph(pl_module, features_ND)
        penalty = self.compute_penalty(features_ND, logits_NC, targets_N, domains_N, weight, trainer)
        if weight > 0 and not penalty.requires_grad and torch.is_grad_enabled():
            raise FishrInputError(
                f"{kind}'s penalty weight is {weight} but its penalty carries no autograd graph (the head ran under "
                "torch.no_grad/inference_mode, or on detached tensors), so it would change nothing. Run the head's "
                "forward with gradients enabled."
            )
        self._last_penalty = penalty.detach()
        batch_size = features_ND.shape[0]
        pl_module.log(f"{self.name}/penalty", self._last_penalty, on_step=True, on_epoch=False, batch_size=batch_size)
        pl_module.log(f"{self.name}/weight", weight, on_step=True, on_epoch=False, batch_size=batch_size)
        if isinstance(output, Tensor):
            return self.combine(output, penalty, weight)
        if isinstance(output, Mapping) and "loss" in output:
            combined = self.combine(output["loss"], penalty, weight)
            result = {**output, "loss": combined}
            if not self.penalty_in_domainbed_loss:
                result[DOMAINBED_LOSS_KEY] = output.get(DOMAINBED_LOSS_KEY, output["loss"].detach())
            elif DOMAINBED_LOSS_KEY in output:  # an earlier callback's penalty is left out: this one's term is not
                result[DOMAINBED_LOSS_KEY] = output[DOMAINBED_LOSS_KEY] + (combined - output["loss"]).detach()
            return result
        raise FishrInputError(
            f"training_step returned a {type(output).__name__}; {kind} adds its penalty to a loss tensor or "
            "to the 'loss' entry of a dict. Return one of those."
        )

    def _several_forwards_hint(self) -> str:
        return "."

    def _check_features_carry_the_graph(self, pl_module: pl.LightningModule, features_ND: Tensor) -> None:
        """Refuse features cut off from a trainable backbone: the penalty's gradient would not reach it.

        Features without a graph are fine when nothing before the head trains (a linear probe).
        """
        if features_ND.requires_grad:
            return
        head_parameters = {id(p) for p in self._head_module.parameters()}
        if any(p.requires_grad and id(p) not in head_parameters for p in pl_module.parameters()):
            raise FishrInputError(
                f"The input of the {type(self).__name__} head {self.head!r} carries no autograd graph (it was "
                "detached, or computed under torch.no_grad) while the module has trainable parameters before the "
                "head, so the penalty's gradient would not reach them. Compute the features with gradients "
                "enabled and without .detach(), or freeze the backbone (requires_grad=False)."
            )
