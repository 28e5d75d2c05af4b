"""DomainBed's networks (``domainbed/networks.py``) with DomainBed's attribute names, so that a module built
from them has the keys of DomainBed's ``algorithm.state_dict()``: ``Featurizer(input_shape, hparams)`` picks
the network for an input shape, ``Classifier`` the head. ``build_algorithm(featurizer=None)`` uses them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


class MLP(nn.Module):
    """DomainBed's ``MLP``: ``input``, ``mlp_depth − 2`` ``hiddens``, ``output`` (linear, ``n_outputs``
    features), dropout and ReLU after every layer but the last."""

    def __init__(self, n_inputs: int, n_outputs: int, hparams: dict[str, Any]) -> None:
        super().__init__()
        width = hparams["mlp_width"]
        self.input = nn.Linear(n_inputs, width)
        self.dropout = nn.Dropout(hparams["mlp_dropout"])
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(hparams["mlp_depth"] - 2)])
        self.output = nn.Linear(width, n_outputs)
        self.n_outputs = n_outputs
        self.activation = nn.Identity()  # DomainBed's: URM sets its generator's output activation here

    def forward(self, x_ND: Tensor) -> Tensor:
        x = F.relu(self.dropout(self.input(x_ND)))
        for hidden in self.hiddens:
            x = F.relu(self.dropout(hidden(x)))
        return self.activation(self.output(x))


class MNIST_CNN(nn.Module):  # noqa: N801 (DomainBed's name)
    """DomainBed's MNIST network: four 3×3 convolutions, each followed by ReLU and a GroupNorm that
    DomainBed names ``bn0``…``bn3``, mean-pooled to 128 features."""

    n_outputs = 128

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.bn0 = nn.GroupNorm(8, 64)
        self.bn1 = nn.GroupNorm(8, 128)
        self.bn2 = nn.GroupNorm(8, 128)
        self.bn3 = nn.GroupNorm(8, 128)
        self.activation = nn.Identity()  # DomainBed's: URM sets its generator's output activation here

    def forward(self, x_NCHW: Tensor) -> Tensor:
        x = self.bn0(F.relu(self.conv1(x_NCHW)))
        x = self.bn1(F.relu(self.conv2(x)))
        x = self.bn2(F.relu(self.conv3(x)))
        x = self.bn3(F.relu(self.conv4(x)))
        return self.activation(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """DomainBed's classic ``ResNet``: torchvision's ResNet-50 (``resnet18``: 18) with ImageNet weights,
    ``fc`` removed, BatchNorm statistics frozen while ``freeze_bn`` (DomainBed's default ``True``), dropout
    ``resnet_dropout`` on the features. ``pretrained=False`` starts from random weights (tests, no internet)."""

    def __init__(self, input_shape: Sequence[int], hparams: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__()
        name = "resnet18" if hparams.get("resnet18", False) else "resnet50"
        weights = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V1"}[name] if pretrained else None
        self.network = getattr(torchvision.models, name)(weights=weights)
        self.n_outputs = self.network.fc.in_features
        self.network.fc = nn.Identity()
        if input_shape[0] != 3:  # DomainBed: the pretrained filters repeated over the channels
            filters = self.network.conv1.weight.data.clone()
            self.network.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
            for channel in range(input_shape[0]):
                self.network.conv1.weight.data[:, channel] = filters[:, channel % 3]
        self.freeze_bn = bool(hparams.get("freeze_bn", True))
        self.dropout = nn.Dropout(hparams.get("resnet_dropout", 0.0))
        self.activation = nn.Identity()  # DomainBed's: URM sets its generator's output activation here
        self.train()

    def forward(self, x_NCHW: Tensor) -> Tensor:
        return self.activation(self.dropout(self.network(x_NCHW)))

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if self.freeze_bn:
            for module in self.network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def Featurizer(input_shape: Sequence[int], hparams: dict[str, Any]) -> nn.Module:  # noqa: N802 (DomainBed's name)
    """DomainBed's choice of network for an input shape: an MLP for vectors, the MNIST CNN for 28×28
    images, the ResNet otherwise."""
    input_shape = tuple(input_shape)
    if len(input_shape) == 1:
        return MLP(input_shape[0], hparams["mlp_width"], hparams)
    if input_shape[1:3] == (28, 28):
        return MNIST_CNN(input_shape)
    return ResNet(input_shape, hparams)


def Classifier(in_features: int, out_features: int, is_nonlinear: bool = False) -> nn.Module:  # noqa: N802
    """DomainBed's head: linear, or three linear layers halving the width (``nonlinear_classifier``)."""
    if is_nonlinear:
        return nn.Sequential(
            nn.Linear(in_features, in_features // 2),
            nn.ReLU(),
            nn.Linear(in_features // 2, in_features // 4),
            nn.ReLU(),
            nn.Linear(in_features // 4, out_features),
        )
    return nn.Linear(in_features, out_features)


def adam(parameters: Any, hparams: dict[str, Any], lr_key: str = "lr", wd_key: str = "weight_decay", **kwargs: Any):
    """``torch.optim.Adam`` as DomainBed's classes build it from their hyperparameters."""
    return torch.optim.Adam(parameters, lr=hparams[lr_key], weight_decay=hparams[wd_key], **kwargs)
