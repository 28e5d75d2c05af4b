"""``SWADCallback``: SWAD's dense, loss-valley weight averaging for any Lightning Trainer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from fishr_lightning.averaging.batchnorm import trainable_batchnorms
from fishr_lightning.averaging.batchnorm_update import (
    InputsFromBatch,
    TrainingBatches,
    check_num_batches,
    default_inputs_from_batch,
    default_training_batches,
    update_batchnorm_from_training,
)
from fishr_lightning.averaging.loss_valley import LossValley
from fishr_lightning.functional import FishrInputError

__all__ = ["SWADCallback", "SWADSummary", "default_inputs_from_batch"]


class _Parameters(nn.Module):
    """A module's parameters, in ``parameters()`` order, as a module of their own: what SWAD averages
    (parameters only). ``AveragedModel`` deep-copies the module it is given: given this, it copies the
    parameters, not the LightningModule with its trainer, hooks and wrapped ``training_step``."""

    def __init__(self, parameters: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.values = nn.ParameterList(parameters)


def averaging_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SWAD averages a parameter of ``dtype`` in: float32 for half-precision parameters, as
    Lightning's ``EMAWeightAveraging`` keeps its copy (issue 25: averaged in bfloat16, a weight drifting
    0.05 -> 0.08 over 300 steps averages to 0.0500, not 0.0650, as each step's share ``(w − avg) / (n + 1)``
    falls under half of bfloat16's spacing), the parameters' own dtype otherwise: float32 and float64
    runs average exactly as khanrc/swad's ``AveragedModel`` does."""
    return torch.promote_types(dtype, torch.float32)


def _averaging_copy(parameters: Iterable[nn.Parameter]) -> _Parameters:
    """A detached copy of ``parameters``, each in its ``averaging_dtype``: the segment average's storage."""
    return _Parameters(
        nn.Parameter(p.detach().to(averaging_dtype(p.dtype), copy=True), requires_grad=False) for p in parameters
    )


def _averaging_view(parameters: _Parameters) -> _Parameters:
    """``parameters`` as the average reads them: themselves where each is in its averaging dtype, else
    their casts (``AveragedModel`` moves the model's tensors to its device but keeps their dtype, and its
    ``foreach`` update needs both sides in one dtype)."""
    if all(p.dtype == averaging_dtype(p.dtype) for p in parameters.parameters()):
        return parameters
    return _Parameters(
        nn.Parameter(p.detach().to(averaging_dtype(p.dtype)), requires_grad=False) for p in parameters.parameters()
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


class SWADCallback(Callback):
    r"""SWAD (Cha et al., "SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021): dense
    weight averaging over the *loss valley* of a validation loss.

    Training is cut into segments by the validation runs. Within a segment the weights after every
    optimizer step are averaged (a ``torch.optim.swa_utils.AveragedModel`` of the parameters, one
    extra copy on the training device, in float32 for half-precision parameters, as Lightning's EMA
    keeps its copy: the average is cast to the parameters' dtype only when it is put in the module);
    after each validation the segment's average is kept on the CPU and the monitored loss goes to
    ``LossValley``, which decides, as khanrc/swad does, which
    segments make the final average (see ``fishr_lightning.averaging.loss_valley``). At the end of
    training the module's parameters are replaced by that average and, where the model has BatchNorm
    layers in training mode, their statistics are recomputed on training batches as khanrc/swad's
    ``update_bn`` does (the next ``bn_update_batches`` batches, cumulative average). The current
    model, not the average, is what validation sees during training.

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
            Fewer batches than asked is a warning naming the number; none is an error.
        inputs_from_batch: ``batch -> inputs`` of the module's ``forward`` for the recomputation
            (default: ``batch[0]``, or ``batch["x"]``).
        bn_batches: ``trainer -> iterable of training batches`` for the recomputation (default: a
            fresh pass over ``trainer.train_dataloader``). A loader whose sampler ends at the last step
            gives none after training: pass the batches of the steps after it (the app does).

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
        bn_batches: TrainingBatches | None = None,
    ) -> None:
        self.monitor = monitor
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.early_stop = early_stop
        self.bn_update_batches = check_num_batches(bn_update_batches)
        self.inputs_from_batch = inputs_from_batch or default_inputs_from_batch
        self.bn_batches = bn_batches or default_training_batches
        self.summary: SWADSummary | None = None
        self._reset()

    def _reset(self) -> None:
        self.valley.reset()
        self.summary = None
        # The segment being averaged: parameters only, as SWAD's AveragedModel (averaged BatchNorm
        # statistics would not match the averaged weights; they are recomputed at the end instead).
        self._segment: AveragedModel | None = None
        self._parameters: _Parameters | None = None
        self._restored_segment: dict[str, Any] | None = None  # from a checkpoint, until the segment exists
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: layers made in configure_model exist, and the module is on its device.
        self._parameters = _Parameters(pl_module.parameters())
        self._segment = AveragedModel(_averaging_copy(self._parameters.parameters()), use_buffers=False)
        restored, self._restored_segment = self._restored_segment, None
        if restored is not None:
            with torch.no_grad():
                for p, saved in zip(self._segment.module.parameters(), restored["parameters"]):
                    p.copy_(saved.to(p.device))
                self._segment.n_averaged.fill_(restored["n_averaged"])

    # -- during training ------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batchnorm_trainable is None:  # what training does, not what eval()/train() say at the end
            self._batchnorm_trainable = bool(trainable_batchnorms(pl_module))
        if trainer.global_step > self._latest_update_step:  # an optimizer step happened
            if self._segment_first_step is None:
                self._segment_first_step = trainer.global_step
            self._segment.update_parameters(_averaging_view(self._parameters))
            self._latest_update_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or trainer.state.fn != TrainerFn.FITTING:
            return
        self.end_segment(trainer, self._monitored_loss(trainer))

    def end_segment(self, trainer: pl.Trainer, loss: float) -> None:
        """Close the segment of the steps since the last evaluation, whose weights have validation
        loss ``loss``. Validation runs call it with the monitored metric; a loop that evaluates
        outside Lightning's validation (the app) calls it itself, with ``monitor=None``."""
        if self._segment is None or int(self._segment.n_averaged) == 0:
            return  # no optimizer step since the last evaluation: no new segment
        loss = float(trainer.strategy.broadcast(float(loss), src=0))  # one decision on every rank
        index = self.valley.num_segments
        if not self.valley.dead:
            self._kept_segments[index] = [p.detach().to("cpu", copy=True) for p in self._segment.module.parameters()]
            self._segment_steps[index] = (self._segment_first_step, trainer.global_step)
        for segment in self.valley.update(loss):
            self._add_to_final(segment)
        keep = self.valley.segments_to_keep()
        self._kept_segments = {i: w for i, w in self._kept_segments.items() if i in keep}
        self._segment.n_averaged.zero_()  # the next update starts the next segment
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
            # monitor=None: the caller's own valley loss (the app's), with no metric name to show (issue 30).
            valley = "SWAD's loss valley" + (f" of {self.monitor!r}" if self.monitor is not None else "")
            rank_zero_warn(
                f"{valley} never opened in {self.valley.num_segments} evaluations: the model keeps the last "
                "segment's average (SWAD's own fallback). Train longer or evaluate more often."
            )
            final = self._kept_segments[segments[-1]]
        with torch.no_grad():
            for parameter, average in zip(pl_module.parameters(), final):
                parameter.copy_(average.to(parameter.device))  # the one rounding to a half dtype (issue 25)
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
        return update_batchnorm_from_training(
            trainer, pl_module, self.bn_update_batches, self.bn_batches, self.inputs_from_batch, "SWADCallback"
        )

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        segment = self._restored_segment
        if self._segment is not None:
            segment = {
                "parameters": [p.detach().cpu().clone() for p in self._segment.module.parameters()],
                "n_averaged": int(self._segment.n_averaged),
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
        # A checkpoint of an older version holds half-precision averages: go on in the averaging dtype.
        self._kept_segments = {int(i): _in_averaging_dtype(w) for i, w in state_dict["kept_segments"].items()}
        self._final = None if state_dict["final"] is None else _in_averaging_dtype(state_dict["final"])
        self._final_count = int(state_dict["final_count"])
        self._latest_update_step = int(state_dict["latest_update_step"])
        self._batchnorm_trainable = state_dict["batchnorm_trainable"]
        self._restored_segment = state_dict["segment"]  # applied in on_train_start


def _in_averaging_dtype(weights: Iterable[Tensor]) -> list[Tensor]:
    return [w.to(averaging_dtype(w.dtype)) for w in weights]
