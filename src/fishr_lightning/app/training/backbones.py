"""Featurizers (``domainbed/networks.py``): each maps inputs to ``[N, n_outputs]`` features; the app
puts dropout and the linear ``classifier`` (the Fishr head) after it."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from fishr_lightning.app import AppError

RESNET_WEIGHTS = {
    18: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,  # DomainBed's ``pretrained=True``
    50: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
}
RESNET_FEATURES = {18: 512, 50: 2048}


class ResNetFeaturizer(nn.Module):
    """A torchvision ResNet without its ``fc``, ImageNet weights, BatchNorm statistics frozen
    (DomainBed's ``ResNet``: the paper's setup).

    Args:
        input_shape: ``(C, H, W)``; for ``C != 3`` the first convolution is rebuilt with the
            pretrained filters repeated over the channels (as DomainBed).
        depth: 18 or 50.
        pretrained: start from torchvision's ImageNet weights (default ``True``).
        weights_path: a local copy of those weights (a torchvision ``.pth`` state dict), for machines
            that cannot download them; implies ``pretrained``.
        freeze_batchnorm: keep every BatchNorm in eval mode during training (default ``True``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        depth: int = 50,
        pretrained: bool = True,
        weights_path: str | None = None,
        freeze_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if depth not in RESNET_WEIGHTS:
            raise AppError(f"backbone.depth={depth}: the ResNet backbones have depth 18 or 50.")
        self.network = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if weights_path is not None:
            self.network.load_state_dict(load_local_weights(Path(weights_path).expanduser(), depth))
        elif pretrained:
            self.network.load_state_dict(download_imagenet_weights(depth))
        self.n_outputs = RESNET_FEATURES[depth]
        self.network.fc = nn.Identity()
        channels = input_shape[0]
        if channels != 3:
            pretrained_filters = self.network.conv1.weight.data.clone()
            self.network.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            for channel in range(channels):
                self.network.conv1.weight.data[:, channel] = pretrained_filters[:, channel % 3]
        self.freeze_batchnorm = freeze_batchnorm
        self.train()

    def forward(self, x_NCHW: Tensor) -> Tensor:
        return self.network(x_NCHW)

    def train(self, mode: bool = True) -> ResNetFeaturizer:
        super().train(mode)
        if self.freeze_batchnorm:
            freeze_batchnorm_statistics(self.network)
        return self


def freeze_batchnorm_statistics(network: nn.Module) -> None:
    """Every BatchNorm of ``network`` in eval mode: running statistics used and not updated (DomainBed)."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def has_batchnorm(network: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in network.modules())


def download_imagenet_weights(depth: int) -> dict[str, Tensor]:
    weights = RESNET_WEIGHTS[depth]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise AppError(
            f"The ImageNet weights of resnet{depth} could not be downloaded from {weights.url} ({error}). "
            f"Train from scratch with backbone.pretrained=false, or fetch that file on a machine with "
            f"internet access and either pass backbone.weights_path=/path/to/{Path(weights.url).name} or "
            f"copy it to {cache}, where torchvision looks first."
        ) from None


def load_local_weights(path: Path, depth: int) -> dict[str, Tensor]:
    if not path.is_file():
        raise AppError(
            f"backbone.weights_path={path} is not a file. Point it at torchvision's resnet{depth} ImageNet "
            f"weights ({RESNET_WEIGHTS[depth].url}), or train from scratch with backbone.pretrained=false."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:  # wrong or truncated
        raise AppError(f"backbone.weights_path={path} is not a readable torch state dict ({error}).") from None


class MNISTCNN(nn.Module):
    """DomainBed's hand-tuned MNIST network: four 3×3 convolutions with GroupNorm, mean-pooled."""

    n_outputs = 128

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.norm1 = nn.GroupNorm(8, 64)
        self.norm2 = nn.GroupNorm(8, 128)
        self.norm3 = nn.GroupNorm(8, 128)
        self.norm4 = nn.GroupNorm(8, 128)

    def forward(self, x_NCHW: Tensor) -> Tensor:
        x = self.norm1(F.relu(self.conv1(x_NCHW)))
        x = self.norm2(F.relu(self.conv2(x)))
        x = self.norm3(F.relu(self.conv3(x)))
        x = self.norm4(F.relu(self.conv4(x)))
        return x.mean(dim=(2, 3))


class MLP(nn.Module):
    """``depth`` linear layers of ``width`` units over flattened inputs, each followed by dropout and
    a ReLU. DomainBed's ``MLP`` has the same hidden layers (``mlp_width``, ``mlp_depth``,
    ``mlp_dropout``) but ends in a linear layer; here the app's linear head is that layer."""

    def __init__(
        self, input_shape: Sequence[int], width: int = 256, depth: int = 3, hidden_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 1:
            raise AppError(f"backbone.depth={depth}: an MLP needs at least one layer.")
        layers: list[nn.Module] = []
        in_features = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), nn.Dropout(hidden_dropout), nn.ReLU()]
            in_features = width
        self.layers = nn.Sequential(nn.Flatten(), *layers)
        self.n_outputs = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
