"""DomainBed's MNIST variants (``domainbed/datasets.py``): Colored MNIST (Arjovsky et al.) and Rotated
MNIST, built from torchvision's MNIST files, train then test images, shuffled by a local generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import MNIST
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fishr_lightning.app.data.specs import DatasetSpec, MultiDomainData, data_error
from fishr_lightning.app.seeding import seed_hash

# The probability that ColoredMNIST's colour disagrees with the label, per environment (DomainBed).
COLORED_MNIST_FLIP_PROBABILITY = (0.1, 0.2, 0.9)
ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)


class UInt8ImageDataset(Dataset):
    """Images kept as uint8 ``[N, C, H, W]`` (a quarter of the memory), returned as floats in [0, 1]."""

    def __init__(self, images_NCHW: Tensor, labels_N: Tensor) -> None:
        self.images_NCHW = images_NCHW
        self.labels_N = labels_N

    def __len__(self) -> int:
        return len(self.labels_N)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images_NCHW[index].float().div_(255.0), self.labels_N[index]


def read_mnist(spec: DatasetSpec, data_dir: Path) -> tuple[Tensor, Tensor]:
    """MNIST's 70 000 images ``[N, 28, 28]`` uint8 and digits ``[N]``, train then test (as DomainBed)."""
    try:
        splits = [MNIST(str(data_dir), train=train, download=False) for train in (True, False)]
    except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True ..."
        raise data_error(spec, data_dir, f"MNIST cannot be read from {data_dir / 'MNIST' / 'raw'} ({error}).") from None
    except (ValueError, AssertionError, OSError) as error:  # truncated or wrong idx files
        raise data_error(
            spec, data_dir, f"MNIST's files under {data_dir / 'MNIST' / 'raw'} are malformed ({error})."
        ) from None
    return torch.cat([s.data for s in splits]), torch.cat([s.targets for s in splits])


def load_mnist_domains(spec: DatasetSpec, data_dir: Path, seed: int) -> MultiDomainData:
    images_N28x28, digits_N = read_mnist(spec, data_dir)
    generator = torch.Generator().manual_seed(seed_hash(spec.name, seed))
    shuffle = torch.randperm(len(digits_N), generator=generator)
    images_N28x28, digits_N = images_N28x28[shuffle], digits_N[shuffle]
    num_domains = len(spec.environments)
    domains: list[Dataset] = []
    for domain in range(num_domains):
        images, digits = images_N28x28[domain::num_domains], digits_N[domain::num_domains]
        if spec.name == "ColoredMNIST":
            domains.append(colored_mnist_domain(images, digits, COLORED_MNIST_FLIP_PROBABILITY[domain], generator))
        else:
            domains.append(rotated_mnist_domain(images, digits, ROTATED_MNIST_ANGLES[domain]))
    return MultiDomainData(spec=spec, domains=domains, input_shape=spec.input_shape)


def colored_mnist_domain(
    images_N28x28: Tensor, digits_N: Tensor, colour_flip_probability: float, generator: torch.Generator
) -> Dataset:
    """Arjovsky et al.'s Colored MNIST as DomainBed builds it: binary label ``digit < 5`` flipped with
    probability 0.25; the colour (which of two channels holds the digit) is the label flipped with
    probability ``colour_flip_probability``."""
    n = len(digits_N)
    labels_N = (digits_N < 5).long() ^ (torch.rand(n, generator=generator) < 0.25).long()
    colours_N = labels_N ^ (torch.rand(n, generator=generator) < colour_flip_probability).long()
    images_N2HW = torch.stack([images_N28x28, images_N28x28], dim=1)
    images_N2HW[torch.arange(n), 1 - colours_N] = 0
    return UInt8ImageDataset(images_N2HW, labels_N)


def rotated_mnist_domain(images_N28x28: Tensor, digits_N: Tensor, angle: float) -> Dataset:
    """DomainBed's rotation: image by image on PIL images, bilinear filter, zero fill (DomainBed's
    ``datasets.py`` since April 2021, ``InterpolationMode.BILINEAR``, and the Fishr authors' fork)."""
    rotated_NHW = np.stack(
        [
            np.asarray(TF.rotate(Image.fromarray(image), angle, interpolation=InterpolationMode.BILINEAR, fill=0))
            for image in images_N28x28.numpy()
        ]
    )
    return UInt8ImageDataset(torch.from_numpy(rotated_NHW)[:, None], digits_N.long())
