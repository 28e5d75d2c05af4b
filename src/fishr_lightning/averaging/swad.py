"""``SWADCallback``: SWAD's dense, loss-valley weight averaging for any Lightning Trainer."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from fishr_lightning.averaging.batchnorm import recompute_batchnorm_statistics, trainable_batchnorms
from fishr_lightning.averaging.loss_valley import LossValley
from fishr_lightning.functional import FishrInputError

InputsFromBatch = Callable[[Any], Any]


def default_inputs_from_batch(batch: Any) -> Any:
    """``x`` of ``(x, y, ...)`` tuples or of mappings with a key ``x``."""
    if isinstance(batch, Mapping) and "x" in batch:
        return batch["x"]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 1:
        return batch[0]
    raise FishrInputError(
        f"SWADCallback recomputes BatchNorm statistics by running the model on training inputs, but a "
        f"training batch is a {type(batch).__name__} it cannot read the inputs from. Pass "
        "inputs_from_batch=lambda batch: inputs, or bn_update_batches=0 to keep the statistics as they are."
    )


@dataclass(frozen=True)
class SWADSummary:
    """What the final weights are: ``status`` (valley closed / run ended in the valley / valley never
    opened), the optimizer steps the averaged segments span (1-based, as ``trainer.global_step``
    counts them), and how many segment averages (with multiplicity) and evaluations made them."""

    status: str
    start_step: int
    end_step: int
    num_averaged_segments: int
    num_segments: int
    converged_at_step: int | None
    stopped_early: bool
    batchnorm_batches: int

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


class SWADCallback(WeightAveraging):
    r"""SWAD (Cha et al., "SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021): dense
    weight averaging over the *loss valley* of a validation loss.

    Training is cut into segments by the validation runs. Within a segment the weights after every
    optimizer step are averaged (Lightning's ``WeightAveraging`` over ``torch.optim.swa_utils.AveragedModel``,
    one extra copy of the parameters on the model's device); after each validation the segment's
    average is kept on the CPU and the monitored loss goes to ``LossValley``, which decides, as
    khanrc/swad does, which segments make the final average (see ``fishr_lightning.averaging.loss_valley``).
    At the end of training the module's parameters are replaced by that average and, where the model
    has BatchNorm layers in training mode, their statistics are recomputed on training batches. The
    current model, not the average, is what validation sees during training.

    Args:
        monitor: the validation loss that places the valley, as logged (SWAD and the app: the mean
            loss over the training domains' held-out splits). It must be logged at every validation.
            ``None``: segments end only when ``end_segment`` is called (a loop evaluating by itself).
        n_converge: the valley opens when the oldest of the last ``n_converge`` losses is the lowest
            (default 3, SWAD's).
        n_tolerance: the valley closes when the lowest of the last ``n_tolerance`` losses exceeds the
            threshold (default 6, SWAD's).
        tolerance_ratio: threshold = mean of the ``n_converge`` losses at the opening × (1 + ratio)
            (default 0.3, SWAD's; its VLCS setting is 0.2).
        early_stop: stop training when the valley closes, as SWAD does (default ``True``).
        bn_update_batches: training batches over which BatchNorm statistics are recomputed for the
            averaged weights (default 500, SWAD's; 0 keeps the current statistics). Models whose
            BatchNorm layers stay in eval mode during training (DomainBed's frozen BatchNorm) need none.
        inputs_from_batch: ``batch -> inputs`` of the module's ``forward`` for the recomputation
            (default: ``batch[0]``, or ``batch["x"]``).

    After ``fit``, ``summary`` (a ``SWADSummary``) says what the weights are. The callback's state
    (the segment being averaged, the kept segments, the valley) is saved in checkpoints: a run
    resumed mid-valley ends on the uninterrupted run's weights. Steps after the last validation are
    not averaged (they belong to no evaluated segment).
    """

    def __init__(
        self,
        monitor: str | None,
        n_converge: int = 3,
        n_tolerance: int = 6,
        tolerance_ratio: float = 0.3,
        early_stop: bool = True,
        bn_update_batches: int = 500,
        inputs_from_batch: InputsFromBatch | None = None,
    ) -> None:
        # Parameters only, as SWAD's AveragedModel: averaged BatchNorm statistics would not match the
        # averaged weights; they are recomputed at the end instead.
        super().__init__(use_buffers=False)
        if isinstance(bn_update_batches, bool) or not isinstance(bn_update_batches, int) or bn_update_batches < 0:
            raise FishrInputError(f"bn_update_batches={bn_update_batches!r}: a number of training batches, 0 or more.")
        self.monitor = monitor
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.early_stop = early_stop
        self.bn_update_batches = bn_update_batches
        self.inputs_from_batch = inputs_from_batch or default_inputs_from_batch
        self.summary: SWADSummary | None = None
        self._reset()

    def _reset(self) -> None:
        self.valley.reset()
        self.summary = None
        self._latest_update_step = 0
        self._segment_first_step: int | None = None
        self._segment_steps: dict[int, tuple[int, int]] = {}  # segment -> (first, last) optimizer step
        self._kept_segments: dict[int, list[Tensor]] = {}  # segment -> its average (CPU), while still needed
        self._final: list[Tensor] | None = None  # running mean of the added segments' averages (CPU)
        self._final_count = 0
        self._batchnorm_trainable: bool | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise FishrInputError(
                "SWADCallback averages the weights after every optimizer step that Lightning runs, which manual "
                "optimization hides from callbacks. Use automatic optimization, or average by hand with "
                "fishr_lightning.averaging.LossValley and torch.optim.swa_utils.AveragedModel."
            )
        self._reset()  # a new fit starts afresh; a checkpoint's state is loaded after this
        super().setup(trainer, pl_module, stage)

    # -- during training ------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batchnorm_trainable is None:
            self._batchnorm_trainable = bool(trainable_batchnorms(pl_module))
        if trainer.global_step > self._latest_update_step and self._segment_first_step is None:
            self._segment_first_step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation sees the current weights (SWAD's losses are the current model's)."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """(No swap: see ``on_validation_epoch_start``.)"""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or trainer.state.fn != TrainerFn.FITTING:
            return
        self.end_segment(trainer, self._monitored_loss(trainer))

    def end_segment(self, trainer: pl.Trainer, loss: float) -> None:
        """Close the segment of the steps since the last evaluation, whose weights have validation
        loss ``loss``. Validation runs call it with the monitored metric; a loop that evaluates
        outside Lightning's validation (the app) calls it itself, with ``monitor=None``."""
        if self._average_model is None or int(self._average_model.n_averaged) == 0:
            return  # no optimizer step since the last evaluation: no new segment
        loss = float(trainer.strategy.broadcast(float(loss), src=0))  # one decision on every rank
        index = self.valley.num_segments
        if not self.valley.dead:
            self._kept_segments[index] = [
                p.detach().to("cpu", copy=True) for p in self._average_model.module.parameters()
            ]
            self._segment_steps[index] = (self._segment_first_step, trainer.global_step)
        for segment in self.valley.update(loss):
            self._add_to_final(segment)
        keep = self.valley.segments_to_keep()
        self._kept_segments = {i: w for i, w in self._kept_segments.items() if i in keep}
        self._average_model.n_averaged.zero_()  # the next update starts the next segment
        self._segment_first_step = None
        if self.valley.dead and self.early_stop:
            trainer.should_stop = True

    def _monitored_loss(self, trainer: pl.Trainer) -> float:
        if self.monitor not in trainer.callback_metrics:
            raise FishrInputError(
                f"SWADCallback monitors {self.monitor!r}, but this validation logged only "
                f"{sorted(trainer.callback_metrics)}. Log the validation loss in validation_step "
                f"(self.log({self.monitor!r}, loss)) or pass monitor= the name of one that is logged."
            )
        return float(trainer.callback_metrics[self.monitor])

    def _add_to_final(self, segment: int) -> None:
        weights = self._kept_segments[segment]
        if self._final is None or self._final_count == 0:
            self._final = [w.clone() for w in weights]
        else:  # running mean, as AveragedModel: avg + (w - avg) / (n + 1)
            for average, w in zip(self._final, weights):
                average.add_(w - average, alpha=1.0 / (self._final_count + 1))
        self._final_count += 1

    # -- at the end -----------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.valley.num_segments == 0:
            raise FishrInputError(
                "SWADCallback saw no validation during training, so there is no segment to average. Validate "
                "several times during training (val_check_interval=..., check_val_every_n_epoch=...), or train "
                "longer than the first validation."
            )
        segments = self.valley.final_segments()
        if self.valley.converged:
            for segment in self.valley.closing_segments():
                self._add_to_final(segment)
            final = self._final if self._final_count else self._kept_segments[self.valley.converge_segment]
        else:
            rank_zero_warn(
                f"SWAD's loss valley of {self.monitor!r} never opened in {self.valley.num_segments} evaluations: the "
                "model keeps the last segment's average (SWAD's own fallback). Train longer or evaluate more often."
            )
            final = self._kept_segments[segments[-1]]
        with torch.no_grad():
            for parameter, average in zip(pl_module.parameters(), final):
                parameter.copy_(average.to(parameter.device))
        batchnorm_batches = self._recompute_batchnorm(trainer, pl_module)
        converged_at = self._segment_steps.get(self.valley.converge_segment, (None, None))[1]
        self.summary = SWADSummary(
            status=self.valley.status(),
            start_step=self._segment_steps[segments[0]][0],
            end_step=self._segment_steps[segments[-1]][1],
            num_averaged_segments=len(segments),
            num_segments=self.valley.num_segments,
            converged_at_step=converged_at if self.valley.converged else None,
            stopped_early=self.valley.dead and self.early_stop,
            batchnorm_batches=batchnorm_batches,
        )

    def _recompute_batchnorm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if not self._batchnorm_trainable or self.bn_update_batches == 0:
            return 0
        batches = itertools.islice(iter(trainer.train_dataloader), self.bn_update_batches)
        pl_module.train()  # a train() that keeps some BatchNorm layers frozen leaves those as they are
        targets = trainable_batchnorms(pl_module)

        def forward(model: torch.nn.Module, batch: Any) -> Any:
            return model(move_data_to_device(self.inputs_from_batch(batch), pl_module.device))

        return recompute_batchnorm_statistics(pl_module, targets, batches, forward)

    # -- checkpointing --------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The module's own weights stay the checkpoint's ``state_dict``; SWAD's state is the callback's."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """(See ``on_save_checkpoint``.)"""

    def state_dict(self) -> dict[str, Any]:
        segment = None
        if self._average_model is not None:
            segment = {
                "parameters": [p.detach().cpu().clone() for p in self._average_model.module.parameters()],
                "n_averaged": int(self._average_model.n_averaged),
            }
        return {
            "valley": self.valley.state_dict(),
            "segment": segment,
            "segment_first_step": self._segment_first_step,
            "segment_steps": dict(self._segment_steps),
            "kept_segments": dict(self._kept_segments),
            "final": self._final,
            "final_count": self._final_count,
            "latest_update_step": self._latest_update_step,
            "batchnorm_trainable": self._batchnorm_trainable,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.valley.load_state_dict(state_dict["valley"])
        self._segment_first_step = state_dict["segment_first_step"]
        self._segment_steps = {int(i): tuple(steps) for i, steps in state_dict["segment_steps"].items()}
        self._kept_segments = {int(i): list(w) for i, w in state_dict["kept_segments"].items()}
        self._final = state_dict["final"]
        self._final_count = int(state_dict["final_count"])
        self._latest_update_step = int(state_dict["latest_update_step"])
        self._batchnorm_trainable = state_dict["batchnorm_trainable"]
        segment = state_dict["segment"]
        if segment is not None and self._average_model is not None:
            with torch.no_grad():
                for p, saved in zip(self._average_model.module.parameters(), segment["parameters"]):
                    p.copy_(saved.to(p.device))
                self._average_model.n_averaged.fill_(segment["n_averaged"])
