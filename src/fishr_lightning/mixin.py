"""``FishrMixin``: the Fishr penalty as a method of your LightningModule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fishr_lightning import distributed
from fishr_lightning.functional import FishrInputError
from fishr_lightning.head_penalty import fit_steps
from fishr_lightning.options import FishrOptions
from fishr_lightning.penalty import FishrPenalty
from fishr_lightning.schedule import (
    FishrSchedule,
    PenaltyScheduleWarning,
    warmup_outlasts_run,
    warmup_outlasts_run_message,
)


class FishrMixin:
    """Fishr for modules that add the penalty themselves, e.g. under manual optimization.

    Use it before ``LightningModule`` in the bases, call ``configure_fishr(...)`` in ``__init__``
    and add ``self.fishr_loss(features, logits, y, domains)`` (already multiplied by λ_t) to the
    loss::

        class Model(FishrMixin, pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.featurizer, self.classifier = ..., nn.Linear(512, 7)
                self.configure_fishr(self.classifier, penalty_weight=1000.0, warmup_steps=1500, ema=0.95)

            def training_step(self, batch, batch_idx):
                x, y, domains = batch
                features = self.featurizer(x)
                logits = self.classifier(features)
                return F.cross_entropy(logits, y) + self.fishr_loss(features, logits, y, domains)

    Training this way equals training the same module with ``FishrCallback``, fit after fit: each
    fit starts afresh (EMA, inferred ``num_domains``, optimizer reset) unless it resumes from a
    checkpoint, whose state it restores. The mixin defines ``setup`` (the fresh start),
    ``on_train_batch_start`` (the optimizer reset at warm-up, and at a fit's first batch a
    ``PenaltyScheduleWarning`` when ``warmup_steps`` is at or past the fit's last step) and ``on_save_checkpoint`` /
    ``on_load_checkpoint`` (the EMA state): call ``super()`` if you override them (a ``setup``
    that does not is refused at the first batch).
    ``configure_fishr`` takes the options of ``FishrCallback`` (``FishrOptions``); its ``head`` is
    the ``nn.Linear`` itself (or ``None`` with ``head_bias`` saying whether the head
    has a bias: a bias-free head has ``C·D`` parameters, and the penalty's mean runs over those).
    The optimizer reset fires once, at the first step ``≥ warmup_steps``, also when ``global_step``
    advances by more than one per batch (several optimizers, manual optimization). Under DDP
    ``num_domains`` may be left out: it is the largest id over all ranks, plus one.
    """

    fishr: FishrPenalty
    fishr_schedule: FishrSchedule

    def configure_fishr(self, head: nn.Linear | None = None, *, head_bias: bool | None = None, **options: Any) -> None:
        """Set Fishr up for this module: call it in ``__init__``.

        Args:
            head: the final ``nn.Linear`` itself (``self.classifier``), created before this call; or
                ``None``, with ``head_bias`` saying whether the head has a bias.
            head_bias: whether the head has a bias, when no ``head`` is given (default ``True``).
            options: Fishr's options as keyword arguments (``penalty_weight``, ``warmup_steps``,
                ``ema``, ...), each documented once in ``FishrOptions``; kept as ``self.fishr_options``.
        """
        FishrOptions.check_names("configure_fishr", options)
        fishr_options = FishrOptions(**options)
        if head is not None and not isinstance(head, nn.Linear):
            raise FishrInputError(
                f"configure_fishr's head is a {type(head).__name__}; pass the final nn.Linear module itself "
                "(e.g. self.configure_fishr(self.classifier, ...)), after creating it in __init__."
            )
        if head is not None and head_bias is not None and head_bias != (head.bias is not None):
            raise FishrInputError(
                f"head_bias={head_bias} contradicts the head, which {'has' if head.bias is not None else 'has no'} "
                "bias: pass only the head."
            )
        # A tuple, not an attribute holding the module: nn.Module would register it a second time.
        self._fishr_head = (head,)
        self.fishr_options = fishr_options
        self.fishr = fishr_options.make_penalty(
            head_bias=head.bias is not None if head is not None else (True if head_bias is None else head_bias)
        )
        self.fishr_schedule = fishr_options.make_schedule()

    @property
    def fishr_weight(self) -> float:
        """λ at the current optimizer step."""
        return self.fishr_schedule.weight(self.trainer.global_step)  # type: ignore[attr-defined]

    def fishr_loss(
        self, features_ND: Tensor, logits_NC: Tensor, targets: Tensor, domains_N: Tensor, head: nn.Linear | None = None
    ) -> Tensor:
        """``λ_t · P`` for this batch (updates the EMA; logs ``fishr/penalty`` and ``fishr/weight``).

        ``head`` defaults to the one given to ``configure_fishr``; ``backend="backpack"`` needs one
        (an ``nn.Linear`` wrapped by ``backpack.extend`` before the forward).
        """
        if not hasattr(self, "fishr"):
            raise FishrInputError("Call self.configure_fishr(...) in __init__ before using fishr_loss.")
        trainer = self.trainer  # type: ignore[attr-defined]
        if self.fishr.reduce_moments is None and trainer.world_size > 1:
            self.fishr.reduce_moments = distributed.distributed_reduction(trainer.world_size)
            self.fishr.reduce_max = distributed.distributed_max(trainer.world_size)
        head = head if head is not None else self._fishr_head[0]
        weight = self.fishr_weight
        penalty = self.fishr.penalty_for_weight(weight, features_ND, logits_NC, targets, domains_N, head)
        log = self.log  # type: ignore[attr-defined]
        log("fishr/penalty", penalty.detach(), on_step=True, on_epoch=False, batch_size=features_ND.shape[0])
        log("fishr/weight", weight, on_step=True, on_epoch=False, batch_size=features_ND.shape[0])
        return weight * penalty

    def setup(self, stage: str) -> None:
        """Each fit starts afresh, as with ``FishrCallback`` (issue 18, item 5): the EMA, an inferred
        ``num_domains`` and the optimizer reset are forgotten here, before Lightning loads a
        checkpoint's state (``ckpt_path``) over them."""
        if stage == "fit" and hasattr(self, "fishr"):
            self.fishr.reset()
            self.fishr_schedule.reset()
            world_size = self.trainer.world_size  # type: ignore[attr-defined]
            self.fishr.reduce_moments = distributed.distributed_reduction(world_size)
            self.fishr.reduce_max = distributed.distributed_max(world_size)
            self._fishr_set_up = True
            self._fishr_run_checked = False
        super().setup(stage)  # type: ignore[misc]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        if hasattr(self, "fishr_schedule"):
            if not getattr(self, "_fishr_set_up", False):
                raise FishrInputError(
                    f"{type(self).__name__} overrides setup() without calling super().setup(stage): FishrMixin "
                    "starts each fit afresh there (EMA, inferred num_domains, optimizer reset), and a second fit "
                    "would carry the first one's state. Call super().setup(stage) in your setup."
                )
            if not getattr(self, "_fishr_run_checked", True):
                self._fishr_run_checked = True
                self._warn_if_warmup_outlasts_fit()
            self.fishr_schedule.maybe_reset(self.trainer.global_step, self.trainer.optimizers)  # type: ignore[attr-defined]
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def _warn_if_warmup_outlasts_fit(self) -> None:
        """The fit's first batch: a warning when ``warmup_steps`` is at or past its last step (issue 30)."""
        run_steps = fit_steps(self.trainer)  # type: ignore[attr-defined]
        if warmup_outlasts_run(self.fishr_schedule.warmup_steps, run_steps):
            message = warmup_outlasts_run_message(
                "configure_fishr", "warmup_steps", self.fishr_schedule, run_steps, "fishr/weight", "max_steps"
            )
            rank_zero_warn(message, category=PenaltyScheduleWarning)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self, "fishr"):
            checkpoint["fishr"] = {
                "penalty": self.fishr.state_dict(),
                "last_reset_step": self.fishr_schedule.last_reset_step,
            }
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self, "fishr") and "fishr" in checkpoint:
            self.fishr.load_state_dict(checkpoint["fishr"]["penalty"])
            self.fishr_schedule.last_reset_step = checkpoint["fishr"]["last_reset_step"]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
