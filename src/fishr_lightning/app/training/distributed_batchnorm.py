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
import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from fishr_lightning.app import AppError


def training_batchnorms(featurizer: nn.Module) -> list[str]:
    """The featurizer's BatchNorm layers in training mode (normalising with batch statistics)."""
    return [
        name
        for name, layer in featurizer.named_modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
    ]


def sync_batchnorm_devices() -> tuple[str, ...]:
    """The devices ``torch.nn.SyncBatchNorm`` synchronises on (its forward refuses the others)."""
    return ("cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name())


def synchronise_batchnorm(trainer: pl.Trainer, featurizer: nn.Module, requested: bool | None) -> None:
    """Turns Lightning's ``sync_batchnorm`` on when several processes train a featurizer with a BatchNorm in
    training mode (``requested``: ``trainer.sync_batchnorm``; ``None``, the default, or ``True``: on; an
    explicit ``False`` is left off); an ``AppError`` where those processes do not run on GPUs."""
    layers = training_batchnorms(featurizer)
    if trainer.world_size <= 1 or not layers:
        return
    device = trainer.strategy.root_device.type
    if device not in sync_batchnorm_devices():
        raise AppError(
            f"The backbone's BatchNorm layers ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}) "
            f"normalise with batch statistics, and {trainer.world_size} processes on {device} would each "
            "normalise over their own share of the batch: not the one-process experiment. Synchronised "
            "BatchNorm (sync_batchnorm), which makes it one, needs GPUs. Freeze the BatchNorm statistics "
            "(backbone.freeze_batchnorm=true, DomainBed's ResNets; timm: backbone.freeze_bn=true), train in one "
            "process (trainer=cpu), or use trainer=ddp on GPUs."
        )
    if requested is False:
        return  # trainer.sync_batchnorm=false: each process normalises over its share, as asked
    if not hasattr(trainer.strategy, "_layer_sync"):
        raise AppError(
            f"trainer.strategy={type(trainer.strategy).__name__} cannot synchronise the backbone's BatchNorm "
            "statistics over its processes: use strategy=ddp, or freeze them (backbone.freeze_batchnorm=true)."
        )
    # What Trainer(sync_batchnorm=True) sets; DDP converts the layers to SyncBatchNorm when the fit starts.
    trainer.strategy._layer_sync = TorchSyncBatchNorm()
