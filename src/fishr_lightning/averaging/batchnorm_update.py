"""BatchNorm statistics for averaged weights, in any Trainer: ``BatchNormUpdate`` (after a weight
averaging callback such as Lightning's ``EMAWeightAveraging``) and the function ``SWADCallback`` shares
with it, ``update_batchnorm_from_training``.

The running statistics of averaged weights are not the average of the running statistics: khanrc/swad
(``update_bn(train_minibatches_iterator, model, n_steps)``) re-estimates them after training from the
*next* ``n_steps`` batches of the run's own training iterator, the training domains' inputs
concatenated, as a cumulative average (momentum ``None``). The batches come from a function
``batches(trainer)``: by default a fresh pass over ``trainer.train_dataloader``; a loader whose
sampler stops at the last step (the app's) passes batches of the steps after it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from fishr_lightning.averaging.batchnorm import recompute_batchnorm_statistics, trainable_batchnorms
from fishr_lightning.functional import FishrInputError

InputsFromBatch = Callable[[Any], Any]
_NONE = object()
TrainingBatches = Callable[["pl.Trainer"], Iterable[Any]]


def default_inputs_from_batch(batch: Any) -> Any:
    """``x`` of ``(x, y, ...)`` tuples or of mappings with a key ``x``."""
    if isinstance(batch, Mapping) and "x" in batch:
        return batch["x"]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 1:
        return batch[0]
    raise FishrInputError(
        f"BatchNorm statistics are recomputed by running the model on training inputs, but a training batch "
        f"is a {type(batch).__name__} the inputs cannot be read from. Pass inputs_from_batch=lambda batch: "
        "inputs, or bn_update_batches=0 to keep the statistics as they are."
    )


def default_training_batches(trainer: pl.Trainer) -> Iterable[Any]:
    """A fresh pass over the trainer's training loader."""
    return trainer.train_dataloader


def update_batchnorm_from_training(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_batches: int,
    batches: TrainingBatches = default_training_batches,
    inputs_from_batch: InputsFromBatch = default_inputs_from_batch,
    owner: str = "BatchNormUpdate",
) -> int:
    """Re-estimate the statistics of ``pl_module``'s BatchNorm layers that train (those in training
    mode after ``pl_module.train()``) on the first ``num_batches`` of ``batches(trainer)``; returns how
    many batches were used (0 when no BatchNorm trains).

    Each batch goes the way Lightning's loops send a training batch: the precision plugin's
    ``convert_input``, then ``trainer.strategy.batch_to_device`` (the module's and datamodule's batch
    transfer hooks included), then the forward under the precision plugin's ``forward_context``, on
    the training device. Fewer batches than ``num_batches`` is a warning naming the number; none is an
    error (statistics reset and never re-estimated would be mean 0 / variance 1, silently wrong)."""
    pl_module.train()  # a train() that keeps some BatchNorm layers frozen leaves those as they are
    targets = trainable_batchnorms(pl_module)
    if not targets or num_batches == 0:
        return 0
    precision = trainer.precision_plugin

    def forward(model: torch.nn.Module, batch: Any) -> Any:
        batch = trainer.strategy.batch_to_device(precision.convert_input(batch), dataloader_idx=0)
        with precision.forward_context():
            return model(inputs_from_batch(batch))

    iterator = iter(itertools.islice(batches(trainer), num_batches))
    first = next(iterator, _NONE)
    if first is _NONE:  # checked before the statistics are reset
        raise FishrInputError(
            f"{owner} got no training batch to recompute the BatchNorm statistics of the averaged weights "
            "(a training loader whose sampler stops at the last step is exhausted once training ends), so every "
            "trainable BatchNorm would keep mean 0 / variance 1. Pass batches=lambda trainer: an iterable of "
            "training batches (e.g. those of the steps after the last), or 0 batches to keep the statistics."
        )
    seen = recompute_batchnorm_statistics(pl_module, targets, itertools.chain([first], iterator), forward)
    if seen < num_batches:
        rank_zero_warn(
            f"{owner} recomputed the BatchNorm statistics of the averaged weights on {seen} training batch(es), "
            f"fewer than the {num_batches} asked for (bn_update_batches): the training loader ran out. The "
            "statistics are an average over fewer batches; pass batches that go on past the last step."
        )
    return seen


class BatchNormUpdate(Callback):
    """Recompute the BatchNorm statistics of the weights a weight averaging callback put in the module
    at the end of training (e.g. Lightning's ``EMAWeightAveraging``, whose ``use_buffers=True``
    average of running statistics does not match the averaged weights), as SWAD does for its own.

    Place it *after* the averaging callback in ``callbacks``: its ``on_train_end`` must run once the
    averaged weights are in the module. Only BatchNorm layers that train are touched (the running
    statistics of a model whose BatchNorm stays in eval mode during training, like DomainBed's
    ResNets, are left as they are).

    Args:
        num_batches: training batches for the cumulative average (default 500, SWAD's
            ``bn_update_batches``; 0: do nothing).
        batches: ``trainer -> iterable of training batches`` (default: a fresh pass over
            ``trainer.train_dataloader``).
        inputs_from_batch: ``batch -> inputs`` of the module's ``forward`` (default: ``batch[0]``, or
            ``batch["x"]``).

    After ``fit``, ``batches_used`` says over how many batches the statistics were averaged.
    """

    def __init__(
        self,
        num_batches: int = 500,
        batches: TrainingBatches | None = None,
        inputs_from_batch: InputsFromBatch | None = None,
    ) -> None:
        self.num_batches = check_num_batches(num_batches)
        self.batches = batches or default_training_batches
        self.inputs_from_batch = inputs_from_batch or default_inputs_from_batch
        self.batches_used: int | None = None
        self._batchnorm_trainable: bool | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.batches_used, self._batchnorm_trainable = None, None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batchnorm_trainable is None:  # what training does, not what eval()/train() say at the end
            self._batchnorm_trainable = bool(trainable_batchnorms(pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches_used = 0
        if self._batchnorm_trainable:
            self.batches_used = update_batchnorm_from_training(
                trainer, pl_module, self.num_batches, self.batches, self.inputs_from_batch, "BatchNormUpdate"
            )


def check_num_batches(value: Any) -> int:
    """``value`` if it is a number of batches (an int, 0 or more), else a ``FishrInputError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FishrInputError(f"bn_update_batches={value!r}: a number of training batches, 0 or more (SWAD: 500).")
    return value
