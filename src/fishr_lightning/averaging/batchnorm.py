"""BatchNorm statistics for averaged weights: the running statistics of the averaged model are not
the average of the running statistics, so they are recomputed on training data
(``torch.optim.swa_utils.update_bn`` semantics: a cumulative average over the batches)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def trainable_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that track running statistics and are in training mode.

    Call it while the model is in training mode: a model that freezes its BatchNorm (DomainBed's
    ResNets keep it in eval mode during training) has none, and its statistics need no recomputing.
    """
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module,
    batchnorms: list[nn.modules.batchnorm._BatchNorm],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
) -> int:
    """Reset ``batchnorms``' running statistics and re-estimate them as the plain average over
    ``batches`` of each batch's statistics (momentum ``None``), as ``update_bn`` does; under
    distributed training the ranks' estimates are averaged. Returns the number of batches seen."""
    if not batchnorms:
        return 0
    momenta = {}
    for bn in batchnorms:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in batches:
            forward(model, batch)
            seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for bn in batchnorms:  # each rank saw as many batches: the mean of means is the mean over all
            for statistic in (bn.running_mean, bn.running_var):
                torch.distributed.all_reduce(statistic)
                statistic.div_(world)
    return seen
