"""BatchNorm under DDP (issue 25): the same experiment as one process.

A BatchNorm in training mode normalises each forward's inputs with their batch statistics. One process
sees each step's whole batch (or, for CORAL, MMD, GroupDRO and Mixup's per-domain forwards, a domain's
whole batch); under DDP each of the W processes sees its 1/W share, and would normalise over that share:
another experiment. Synchronised BatchNorm (``torch.nn.SyncBatchNorm``, Lightning's ``sync_batchnorm``)
computes the statistics over every process's share, as one process does. It runs on GPUs only (torch
refuses CPU tensors), so DDP on CPUs with a BatchNorm in training mode is refused.

BatchNorm in training mode: ``resnet50_augmix`` and the ResNets with ``backbone.freeze_batchnorm=false``,
timm's BatchNorm models with ``backbone.freeze_bn=false``. DomainBed's ResNets freeze their BatchNorm
statistics (the default), which needs nothing.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn

from fishr_lightning.app import AppError


def training_batchnorms(featurizer: nn.Module) -> list[str]:
    """The featurizer's BatchNorm layers in training mode (normalising with batch statistics)."""
    return [
        name
        for name, layer in featurizer.named_modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
    ]


# The devices torch.nn.SyncBatchNorm synchronises on (its forward refuses CPU tensors).
SYNC_BATCHNORM_DEVICES = ("cuda", "xpu", "hpu")


def sync_batchnorm_choice(featurizer: nn.Module, requested: bool | None) -> bool:
    """``Trainer(sync_batchnorm=...)``: ``requested`` (``trainer.sync_batchnorm``) where the config sets it,
    else on when a BatchNorm of the featurizer trains. One process ignores it (Lightning applies it to
    parallel strategies only)."""
    return bool(training_batchnorms(featurizer)) if requested is None else bool(requested)


def check_distributed_batchnorm(trainer: pl.Trainer, featurizer: nn.Module) -> None:
    """An ``AppError`` where several processes would train a featurizer's BatchNorm on devices that
    ``SyncBatchNorm`` cannot synchronise (the CPU): each process would normalise over its own share."""
    layers = training_batchnorms(featurizer)
    if trainer.world_size <= 1 or not layers:
        return
    device = trainer.strategy.root_device.type
    if device not in SYNC_BATCHNORM_DEVICES:
        raise AppError(
            f"The backbone's BatchNorm layers ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}) "
            f"normalise with batch statistics, and {trainer.world_size} processes on {device} would each "
            "normalise over their own share of the batch: not the one-process experiment. Synchronised "
            "BatchNorm (sync_batchnorm), which makes it one, needs GPUs. Freeze the BatchNorm statistics "
            "(backbone.freeze_batchnorm=true, DomainBed's ResNets; timm: backbone.freeze_bn=true), train in one "
            "process (trainer=cpu), or use trainer=ddp on GPUs."
        )
