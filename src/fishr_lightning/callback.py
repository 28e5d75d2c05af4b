"""``FishrCallback``: Fishr for any LightningModule, without changing the module."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from fishr_lightning import distributed
from fishr_lightning.head_penalty import HeadPenaltyCallback
from fishr_lightning.heads import TargetsAndDomains
from fishr_lightning.options import FishrOptions


class FishrCallback(HeadPenaltyCallback):
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
        head: attribute path of the final ``nn.Linear`` (``"classifier"``, ``"model.fc"``). Default
            ``None``: ``classifier``, ``fc``, ``head``, ``head.fc`` (timm's ConvNeXt) or ``linear`` (at the
            top level, or under ``model``/``network``), else the module's only ``nn.Linear``; an error when ambiguous.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for other batch layouts.
        name: prefix of the logged keys (``fishr/penalty``, ``fishr/weight``); give each of several
            ``FishrCallback`` on one Trainer (on different heads, say) its own.
        options: Fishr's options as keyword arguments, each documented once in ``FishrOptions``:
            ``penalty_weight`` (λ, DomainBed 1000), ``warmup_steps`` (1500), ``ema`` (γ, 0.95),
            ``backend``, ``num_domains``, ``penalty_ramp_steps``, ``reset_optimizer_at_warmup``,
            ``centered``, ``param_reduction``, ``domain_reduction``, ``loss``. The instance is
            ``callback.options``.

    Semantics worth knowing (the lifecycle, the head, copies and composition with other penalties
    are ``HeadPenaltyCallback``'s, its base):
        - Each ``fit`` starts afresh (EMA, inferred ``num_domains``, optimizer reset) unless it resumes
          from a checkpoint, whose state it restores. Whatever ends the fit (success, an exception,
          ``KeyboardInterrupt``), the module is left as it was found.
        - The head is found at ``on_fit_start``, after ``configure_model``: a head created there works.
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

    name = "fishr"
    manual_optimization_hint = (
        "Use FishrMixin and add self.fishr_loss(...) to the loss you pass to self.manual_backward."
    )

    def __init__(
        self,
        *,
        head: str | None = None,
        targets_and_domains: TargetsAndDomains | None = None,
        name: str = "fishr",
        **options: Any,
    ) -> None:
        FishrOptions.check_names("FishrCallback", options)
        self.options = FishrOptions(**options)  # written so for jsonargparse: it follows **options here
        super().__init__(
            schedule=self.options.make_schedule(), head=head, targets_and_domains=targets_and_domains, name=name
        )
        self.penalty = self.options.make_penalty()

    def compute_penalty(
        self,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets_N: Tensor,
        domains_N: Tensor,
        weight: float,
        trainer: pl.Trainer,
    ) -> Tensor:
        """Fishr's ``P`` (DomainBed's), with the EMA updated; without a graph while ``weight`` is 0."""
        return self.penalty.penalty_for_weight(weight, features_ND, logits_NC, targets_N, domains_N, self._head_module)

    def reset_state(self) -> None:
        """A new fit: forget the EMA and an inferred ``num_domains``."""
        self.penalty.reset()

    def configure_penalty(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """BackPACK's extension of the head, and the cross-rank reductions under DDP."""
        if self.penalty.backend == "backpack":
            from backpack import extend

            extend(self._head_module)
        self.penalty.reduce_moments = distributed.distributed_reduction(trainer.world_size)
        self.penalty.reduce_max = distributed.distributed_max(trainer.world_size)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.accumulate_grad_batches > 1:
            rank_zero_warn(
                f"FishrCallback with accumulate_grad_batches={trainer.accumulate_grad_batches}: each micro-batch "
                "gets its own Fishr penalty, over its own samples only, and moves the EMA once, so the EMA "
                "advances accumulate_grad_batches times per optimizer step. DomainBed computes one penalty "
                "per step over the whole batch: to match it, fit the whole batch at once (or spread it over "
                "devices under DDP, whose per-domain moments are summed over ranks).",
                category=UserWarning,
            )

    def _several_forwards_hint(self) -> str:
        return ", or call the penalty yourself through FishrMixin."

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "penalty": self.penalty.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.penalty.load_state_dict(state_dict["penalty"])
