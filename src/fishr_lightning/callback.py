"""``FishrCallback``: Fishr for any LightningModule, without changing the module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fishr_lightning import distributed, heads
from fishr_lightning.functional import FishrInputError, LossName, PerSampleLoss, Reduction
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.penalty import Backend, FishrPenalty
from fishr_lightning.schedule import FishrSchedule


class FishrCallback(Callback):
    r"""Adds the Fishr penalty (Rame, Dancette & Cord, ICML 2022) to the loss of any LightningModule.

    The callback watches the final ``nn.Linear`` (the *head*): during each ``training_step`` it
    records the head's input features ``[N, D]`` and logits ``[N, C]``, and adds
    ``λ_t · P`` to the loss that ``training_step`` returns, *before* Lightning's single backward
    (callbacks cannot change the loss otherwise, Lightning PR #9770). ``P`` is the distance between
    the training domains' EMA'd variances of the head's per-sample gradients, exactly as
    DomainBed's ``Fishr`` computes it by default.

    Training batches are ``(x, y, domain)`` tuples or mappings with keys ``x``, ``y``, ``domain``;
    ``domain`` holds each sample's training-domain id in ``0 .. num_domains-1``.

    Args:
        penalty_weight: λ once warm-up is over (DomainBed: 1000; random search ``10^U(1,4)``).
        warmup_steps: optimizer steps with λ = 0 (DomainBed: 1500; search ``int U(0, 5000)``). The EMA
            is updated during warm-up too.
        ema: decay γ of each domain's gradient-variance EMA, with DomainBed's ``1/(1-γ)`` correction
            (default 0.95; search ``U(0.90, 0.99)``); 0 disables it.
        head: attribute path of the final ``nn.Linear`` (``"classifier"``, ``"model.fc"``). Default
            ``None``: ``classifier``, ``fc``, ``head``, ``head.fc`` (timm's ConvNeXt) or ``linear`` (at the
            top level, or under ``model``/``network``), else the module's only ``nn.Linear``; an error when ambiguous.
        backend: ``"closed_form"`` (default: exact, two matmuls per step, no per-sample gradient is
            materialised) or ``"backpack"`` (BackPACK ``BatchGrad``, the paper's route).
        num_domains: number of training domains. Default ``None``: ``max id + 1`` of the first batch
            of each fit (under DDP, the largest id over all ranks).
        penalty_ramp_steps: when > 0, λ grows linearly from 0 to ``penalty_weight`` over this many
            steps after warm-up instead of jumping (default 0, DomainBed's jump).
        reset_optimizer_at_warmup: clear the optimizers' state (Adam moments) at step
            ``warmup_steps`` as DomainBed re-creates Adam there (default ``True``).
        centered: centred gradient variance (default) or uncentred second moment (paper, Table 6).
        param_reduction: ``"mean"`` (default, DomainBed) or ``"sum"`` over head parameters.
        domain_reduction: ``"mean"`` (default, DomainBed) or ``"sum"`` over domains.
        loss: per-sample loss of the gradients: ``"cross_entropy"`` (default), ``"bce_with_logits"``
            (one-logit heads) or a callable ``(logits, targets) -> [N]`` of per-sample losses.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.

    Semantics worth knowing:
        - Each ``fit`` starts afresh (EMA, inferred ``num_domains``, optimizer reset) unless it resumes
          from a checkpoint, whose state it restores. Whatever ends the fit (success, an exception,
          ``KeyboardInterrupt``), the module is left as it was found.
        - Only the fit loop's training steps are penalised: a ``validation_step`` (or test or predict
          step) that calls ``self.training_step`` gets the plain output, the EMA does not move and
          nothing is logged.
        - λ is read from ``trainer.global_step`` (optimizer steps). With gradient accumulation each
          micro-batch gets its own penalty, over its own samples, and updates the EMA once;
          Lightning scales each micro-batch's loss, penalty included, by ``1/accumulate_grad_batches``
          (DomainBed has one penalty per step over the whole batch; a warning says so at fit start).
        - Under ``16-mixed``/``bf16-mixed`` the penalty is computed in float32 outside autocast.
        - Under DDP the per-domain moments are all-reduced: each domain's variance is over the
          global batch, and training equals one process on the concatenated batch.
        - Logs ``fishr/penalty`` (the raw ``P``) and ``fishr/weight`` (λ_t) at every step.
        - Checkpoints hold the EMA state, so a resumed run continues the uninterrupted one.
    """

    def __init__(
        self,
        penalty_weight: float = 1000.0,
        warmup_steps: int = 1500,
        ema: float = 0.95,
        head: str | None = None,
        backend: Backend = "closed_form",
        num_domains: int | None = None,
        penalty_ramp_steps: int = 0,
        reset_optimizer_at_warmup: bool = True,
        centered: bool = True,
        param_reduction: Reduction = "mean",
        domain_reduction: Reduction = "mean",
        loss: LossName | PerSampleLoss = "cross_entropy",
        targets_and_domains: TargetsAndDomains | None = None,
    ) -> None:
        self.head = head
        self.requested_head = head
        self.schedule = FishrSchedule(penalty_weight, warmup_steps, penalty_ramp_steps, reset_optimizer_at_warmup)
        self.penalty = FishrPenalty(
            num_domains=num_domains,
            ema=ema,
            centered=centered,
            param_reduction=param_reduction,
            domain_reduction=domain_reduction,
            loss=loss,
            backend=backend,
        )
        self.targets_and_domains = targets_and_domains or heads.default_targets_and_domains
        self._head_module: nn.Linear | None = None
        self._hook: RemovableHandle | None = None
        self._captured: list[tuple[Tensor, Tensor]] = []
        self._capturing = False
        self._module: pl.LightningModule | None = None
        self._wrapper: Any = None
        self._had_training_step_attribute = False
        self._training_step_attribute: Any = None
        self._last_penalty: Tensor | None = None

    @property
    def last_penalty(self) -> float | None:
        """The raw penalty ``P`` of the last training step (before λ; the whole batch's under DDP),
        ``None`` before the first step of a fit. Read by the app for DomainBed's ``penalty`` record
        (issue 18: a public contract instead of Lightning's private logged-metrics store)."""
        return None if self._last_penalty is None else float(self._last_penalty)

    # -- set-up and tear-down -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_setup(trainer, pl_module)
        self.penalty.reset()  # a new fit starts afresh; a checkpoint's state is loaded after setup
        self._last_penalty = None
        self.schedule.reset()
        self.head, self._head_module = heads.resolve_head(pl_module, self.requested_head)
        if self.penalty.backend == "backpack":
            from backpack import extend

            extend(self._head_module)
        self.penalty.reduce_moments = distributed.distributed_reduction(trainer.world_size)
        self.penalty.reduce_max = distributed.distributed_max(trainer.world_size)
        self._install(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches > 1:
            rank_zero_warn(
                f"FishrCallback with accumulate_grad_batches={trainer.accumulate_grad_batches}: each micro-batch "
                "gets its own Fishr penalty, over its own samples only, and moves the EMA once, so the EMA "
                "advances accumulate_grad_batches times per optimizer step. DomainBed computes one penalty "
                "per step over the whole batch: to match it, fit the whole batch at once (or spread it over "
                "devices under DDP, whose per-domain moments are summed over ranks).",
                category=UserWarning,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, when a fit raises (KeyboardInterrupt included).
        self._restore()

    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise FishrInputError(
                "FishrCallback adds the penalty to the loss returned by training_step, which manual "
                "optimization ignores. Use FishrMixin and add self.fishr_loss(...) to the loss you "
                "pass to self.manual_backward."
            )
        if sum(isinstance(cb, FishrCallback) for cb in trainer.callbacks) > 1:
            raise FishrInputError("Only one FishrCallback per Trainer: the callbacks would share one head.")
        owner = getattr(vars(pl_module).get("training_step"), "fishr_callback", None)
        if owner is not None:
            raise FishrInputError(
                f"{type(pl_module).__name__}.training_step is already wrapped by another FishrCallback "
                f"({owner!r}), still attached from a fit that did not finish. Nesting them would add the "
                "penalty twice: call that callback's teardown (or build a fresh module) before fitting again."
            )

    def _install(self, pl_module: pl.LightningModule) -> None:
        """Hook the head and wrap the module's ``training_step``, remembering what was there."""
        self._module = pl_module
        self._had_training_step_attribute = "training_step" in vars(pl_module)
        self._training_step_attribute = vars(pl_module).get("training_step")
        self._hook = self._head_module.register_forward_hook(self._record_head_io, with_kwargs=True)
        self._wrapper = self._training_step_with_penalty(pl_module, pl_module.training_step)
        pl_module.training_step = self._wrapper  # type: ignore[method-assign]

    def _restore(self) -> None:
        """Leave the module as it was found: hook removed, its own ``training_step`` attribute (or
        its absence) back. Idempotent; an attribute someone set over ours is left alone."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        module, self._module = self._module, None
        if module is not None and vars(module).get("training_step") is self._wrapper:
            if self._had_training_step_attribute:
                module.training_step = self._training_step_attribute  # type: ignore[method-assign]
            else:
                del module.training_step  # the class's method is back
        self._wrapper = self._training_step_attribute = None
        self._captured.clear()
        self._capturing = False

    # -- per step -------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.schedule.maybe_reset(trainer.global_step, trainer.optimizers)

    def _record_head_io(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
        if self._capturing:
            self._captured.append((args[0] if args else kwargs["input"], output))

    def _training_step_with_penalty(self, pl_module: pl.LightningModule, original: Any) -> Any:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            trainer = pl_module.trainer
            if not (trainer.state.fn == TrainerFn.FITTING and trainer.training):
                return original(*args, **kwargs)  # validation/test/predict calls pass through
            self._captured.clear()
            self._capturing = True
            try:
                output = original(*args, **kwargs)
                self._capturing = False
                if output is None:  # the module skipped this batch
                    return None
                batch = args[0] if args else kwargs["batch"]
                return self._add_penalty(pl_module, output, batch)
            finally:  # nothing captured outlives the step
                self._capturing = False
                self._captured.clear()

        training_step.fishr_callback = self  # type: ignore[attr-defined]
        return training_step

    def _add_penalty(self, pl_module: pl.LightningModule, output: Any, batch: Any) -> Any:
        if len(self._captured) != 1:
            raise FishrInputError(
                f"The Fishr head {self.head!r} ran {len(self._captured)} times in one training_step; "
                "FishrCallback needs exactly one forward of the head per step, on the whole batch. "
                "Name the right head with head=..., or call the penalty yourself through FishrMixin."
            )
        features_ND, logits_NC = self._captured.pop()
        targets, domains_N = self.targets_and_domains(batch)
        weight = self.schedule.weight(pl_module.trainer.global_step)
        if weight > 0 and logits_NC.requires_grad:  # logits without a graph: penalty_for_weight says so
            self._check_features_carry_the_graph(pl_module, features_ND)
        penalty = self.penalty.penalty_for_weight(weight, features_ND, logits_NC, targets, domains_N, self._head_module)
        batch_size = features_ND.shape[0]
        self._last_penalty = penalty.detach()
        pl_module.log("fishr/penalty", self._last_penalty, on_step=True, on_epoch=False, batch_size=batch_size)
        pl_module.log("fishr/weight", weight, on_step=True, on_epoch=False, batch_size=batch_size)
        if isinstance(output, Tensor):
            return output + weight * penalty if weight > 0 else output
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + weight * penalty} if weight > 0 else output
        raise FishrInputError(
            f"training_step returned a {type(output).__name__}; FishrCallback adds the penalty to a loss "
            "tensor or to the 'loss' entry of a dict. Return one of those."
        )

    def _check_features_carry_the_graph(self, pl_module: pl.LightningModule, features_ND: Tensor) -> None:
        """Refuse features cut off from a trainable backbone: the penalty's gradient would not reach it.

        Features without a graph are fine when nothing before the head trains (a linear probe).
        """
        if features_ND.requires_grad:
            return
        head_parameters = {id(p) for p in self._head_module.parameters()}
        if any(p.requires_grad and id(p) not in head_parameters for p in pl_module.parameters()):
            raise FishrInputError(
                f"The input of the Fishr head {self.head!r} carries no autograd graph (it was detached, or "
                "computed under torch.no_grad) while the module has trainable parameters before the head, "
                "so the penalty's gradient would not reach them. Compute the features with gradients "
                "enabled and without .detach(), or freeze the backbone (requires_grad=False)."
            )

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalty.state_dict(), "last_reset_step": self.schedule.last_reset_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.penalty.load_state_dict(state_dict["penalty"])
        self.schedule.last_reset_step = state_dict.get("last_reset_step")
