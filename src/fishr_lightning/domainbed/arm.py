"""ARM (Zhang et al., "Adaptive Risk Minimization: Learning to Adapt to Domain Shift", NeurIPS 2021),
DomainBed's ``ARM``: the context variant (ARM-CML).

A context network ``h`` maps each image to a one-channel map; the mean over a support set (a batch
of ``support_size = hparams["batch_size"]`` consecutive samples, one domain's minibatch in training)
is appended to every image of the set as an extra channel before ERM's network::

    c_S = (1/|S|) Σ_{x∈S} h(x),     ŷ(x) = f([x ; c_S])      for x ∈ S

trained by ERM's update (the mean cross-entropy of all domains, one Adam step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedError
from fishr_lightning.domainbed.erm import ERM


class ContextNet(nn.Module):
    """DomainBed's ``networks.ContextNet``: three 5×5 convolutions (64, 64, 1 channels, size kept), BatchNorm and
    ReLU after the first two (keys ``context_net.0``, ``.1``, ``.3``, ``.4``, ``.6``)."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        padding = (5 - 1) // 2  # keep the image size
        self.context_net = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 5, padding=padding),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 5, padding=padding),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 1, 5, padding=padding),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.context_net(x)


class ARM(ERM):
    """ERM on ``(C + 1, H, W)`` inputs (the featurizer is built for the context channel: DomainBed's keys
    ``featurizer.*``, ``classifier.*``, ``network.*``) plus ``context_net`` (``context_net.context_net.*``)."""

    ddp_refusal = (
        "its context is the mean over each domain's whole minibatch (the support set), which a DDP rank sees only "
        "a shard of"
    )
    quirks = (
        "the context net is in no optimizer (DomainBed's Adam is ERM's, on `network` only): its weights stay at "
        "their initialisation, only its BatchNorm statistics move",
        "the support size is `hparams['batch_size']` (which DomainBed's registry fixes to 8 outside the small-image "
        "datasets): a batch whose size it does not divide is one support set",
        "at test time the context is the mean over each evaluation batch's consecutive groups of `batch_size` "
        "samples (DomainBed's evaluation batches of 64, one split at a time)",
    )

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, num_domains: int, hparams: dict[str, Any], **kwargs: Any
    ) -> None:
        original_input_shape = tuple(input_shape)
        if len(original_input_shape) != 3:
            raise DomainBedError(
                f"ARM needs images (C, H, W): its context net is convolutional and its context a channel; the input "
                f"shape {original_input_shape} is not one. Use an image dataset (ColoredMNIST, PACS...)."
            )
        context_shape = (1 + original_input_shape[0], *original_input_shape[1:])
        super().__init__(context_shape, num_classes, num_domains, hparams, **kwargs)
        # The module's own input shape stays the data's (what the app and model.pt rebuild it from).
        self.input_shape = original_input_shape
        self.context_net = ContextNet(original_input_shape)
        self.support_size = hparams["batch_size"]

    def predict(self, x: Tensor) -> Tensor:
        batch_size, c, h, w = x.shape
        if batch_size % self.support_size == 0:
            meta_batch_size = batch_size // self.support_size
            support_size = self.support_size
        else:
            meta_batch_size, support_size = 1, batch_size
        context = self.context_net(x)
        context = context.reshape((meta_batch_size, support_size, 1, h, w))
        context = context.mean(dim=1)
        context = torch.repeat_interleave(context, repeats=support_size, dim=0)
        x = torch.cat([x, context], dim=1)
        return self.network(x)
