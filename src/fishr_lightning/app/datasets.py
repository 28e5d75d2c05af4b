"""DomainBed's seven datasets (Gulrajani & Lopez-Paz, ICLR 2021, ``domainbed/datasets.py``) plus the
embedded synthetic default: domain names, class counts, on-disk layouts, transforms.

Every loader returns one ``Dataset`` per domain, in DomainBed's environment order, whose items are
``(x, y)``; ``x`` is a PIL image for the image-folder datasets (the transforms are applied per split
by ``data.py``, so that only the training split is augmented) and a tensor otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import MNIST, ImageFolder
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fishr_lightning.app import AppError
from fishr_lightning.app.hparams import seed_hash

# DomainBed does the same: a few images in TerraIncognita and DomainNet are truncated JPEGs.
ImageFile.LOAD_TRUNCATED_IMAGES = True

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Any], Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    """What the app needs to know about one dataset; ``name`` is DomainBed's class name."""

    name: str
    environments: tuple[str, ...]  # DomainBed's short domain names, in its order
    num_classes: int
    download_name: str  # the argument of ``fishr-download``
    folder: str = ""  # the dataset's directory under ``data_dir``
    domain_folders: tuple[str, ...] = ()  # image-folder datasets: one folder per environment
    input_shape: tuple[int, ...] = ()  # for image folders: channels only, the size is an option


IMAGE_FOLDER_DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "VLCS", ("C", "L", "S", "V"), 5, "vlcs", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), (3,)
        ),
        DatasetSpec(
            "PACS", ("A", "C", "P", "S"), 7, "pacs", "PACS", ("art_painting", "cartoon", "photo", "sketch"), (3,)
        ),
        DatasetSpec(
            "OfficeHome",
            ("A", "C", "P", "R"),
            65,
            "office_home",
            "office_home",
            ("Art", "Clipart", "Product", "Real World"),
            (3,),
        ),
        DatasetSpec(
            "TerraIncognita",
            ("L100", "L38", "L43", "L46"),
            10,
            "terra_incognita",
            "terra_incognita",
            ("location_100", "location_38", "location_43", "location_46"),
            (3,),
        ),
        DatasetSpec(
            "DomainNet",
            ("clip", "info", "paint", "quick", "real", "sketch"),
            345,
            "domain_net",
            "domain_net",
            ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
            (3,),
        ),
    )
}

MNIST_DATASETS = {
    "ColoredMNIST": DatasetSpec("ColoredMNIST", ("+90%", "+80%", "-90%"), 2, "colored_mnist", "MNIST", (), (2, 28, 28)),
    "RotatedMNIST": DatasetSpec(
        "RotatedMNIST", ("0", "15", "30", "45", "60", "75"), 10, "rotated_mnist", "MNIST", (), (1, 28, 28)
    ),
}

# The probability that ColoredMNIST's colour disagrees with the label, per environment (DomainBed).
COLORED_MNIST_FLIP_PROBABILITY = (0.1, 0.2, 0.9)
ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)


def dataset_spec(name: str) -> DatasetSpec:
    from fishr_lightning.app.synthetic import SYNTHETIC_SPEC

    specs = {**IMAGE_FOLDER_DATASETS, **MNIST_DATASETS, SYNTHETIC_SPEC.name: SYNTHETIC_SPEC}
    if name not in specs:
        raise AppError(f"Unknown dataset name {name!r}; the app knows {sorted(specs)}.")
    return specs[name]


@dataclass
class MultiDomainData:
    """One dataset per domain, and how to turn its items into tensors for training and evaluation."""

    spec: DatasetSpec
    domains: list[Dataset]
    input_shape: tuple[int, ...]
    train_transform: Transform | None = None
    eval_transform: Transform | None = None
    class_names: list[str] = field(default_factory=list)


# -- transforms (DomainBed's, for 224×224 ImageNet-pretrained backbones) --------------------------


def eval_image_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Transform:
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_image_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Transform:
    """DomainBed's augmentation for training domains (hparam ``data_augmentation``)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
            transforms.RandomGrayscale(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def use_input_config(data: MultiDomainData, config: dict[str, Any], augment: bool) -> None:
    """The image transforms at a backbone's own input size, mean and std (timm's ``resolve_data_config``);
    DomainBed's augmentation otherwise unchanged. Datasets of tensors (MNIST) are left as they are."""
    if data.eval_transform is None:
        return
    channels, height, width = config["input_size"]
    if height != width:
        raise AppError(f"The backbone's input size {height}x{width} is not square; set backbone.image_size=...")
    mean, std = config["mean"], config["std"]
    data.eval_transform = eval_image_transform(height, mean, std)
    data.train_transform = train_image_transform(height, mean, std) if augment else data.eval_transform
    data.input_shape = (data.input_shape[0], height, width)


# -- bad input ------------------------------------------------------------------------------------


def expected_layout(spec: DatasetSpec, data_dir: Path) -> str:
    if spec.name in MNIST_DATASETS:
        return (
            f"{data_dir / 'MNIST' / 'raw'}/ holding MNIST's four idx files (train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte), as torchvision writes them"
        )
    domains = ", ".join(spec.domain_folders)
    return (
        f"{data_dir / spec.folder}/<domain>/<class>/<image> with the domain folders {domains} "
        f"and the same {spec.num_classes} class folders in each"
    )


def data_error(spec: DatasetSpec, data_dir: Path, problem: str) -> AppError:
    return AppError(
        f"{problem} The {spec.name} dataset is read from {expected_layout(spec, data_dir)}. "
        f"Download it with `fishr-download {spec.download_name} --data-dir {data_dir}`, or point "
        f"data_dir=... at the directory that holds it."
    )


# -- loaders --------------------------------------------------------------------------------------


def load_domains(
    name: str,
    data_dir: str | os.PathLike | None,
    image_size: int = 224,
    augment: bool = True,
    seed: int = 0,
    samples_per_domain: int | None = None,
) -> MultiDomainData:
    """Every domain of dataset ``name`` (DomainBed's class name). ``seed`` drives the random parts of
    the generated and MNIST datasets (shuffle, label noise, colours) through a local generator;
    ``samples_per_domain`` sizes the synthetic dataset."""
    spec = dataset_spec(name)
    if spec.name == "Synthetic":
        from fishr_lightning.app.synthetic import SAMPLES_PER_DOMAIN, synthetic_domains

        return synthetic_domains(seed=seed, samples_per_domain=samples_per_domain or SAMPLES_PER_DOMAIN)
    if data_dir is None:
        raise data_error(spec, Path("<data_dir>"), f"{spec.name} needs data_dir=..., and none was given.")
    data_dir = Path(data_dir).expanduser()
    if spec.name in MNIST_DATASETS:
        return load_mnist_domains(spec, data_dir, seed)
    return load_image_folder_domains(spec, data_dir, image_size, augment)


def load_image_folder_domains(spec: DatasetSpec, data_dir: Path, image_size: int, augment: bool) -> MultiDomainData:
    root = data_dir / spec.folder
    if not root.is_dir():
        raise data_error(spec, data_dir, f"There is no directory {root}.")
    missing = [folder for folder in spec.domain_folders if not (root / folder).is_dir()]
    if missing:
        found = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        raise data_error(spec, data_dir, f"{root} lacks the domain folder(s) {missing} (it has {found}).")
    classes_per_domain = {
        folder: sorted(entry.name for entry in (root / folder).iterdir() if entry.is_dir())
        for folder in spec.domain_folders
    }
    for folder, classes in classes_per_domain.items():
        if len(classes) != spec.num_classes:
            raise data_error(
                spec,
                data_dir,
                f"{root / folder} has {len(classes)} class folders; {spec.name} has {spec.num_classes}.",
            )
    reference_folder, reference_classes = next(iter(classes_per_domain.items()))
    for folder, classes in classes_per_domain.items():
        if classes != reference_classes:
            raise data_error(
                spec,
                data_dir,
                f"The class folders of {root / folder} differ from those of {root / reference_folder} "
                f"({sorted(set(classes) ^ set(reference_classes))}).",
            )
    domains = []
    for folder in spec.domain_folders:
        try:
            domains.append(ImageFolder(str(root / folder)))
        except (FileNotFoundError, OSError) as error:
            raise data_error(spec, data_dir, f"{root / folder} cannot be read as an image folder: {error}") from None
    return MultiDomainData(
        spec=spec,
        domains=domains,
        input_shape=(3, image_size, image_size),
        train_transform=train_image_transform(image_size) if augment else eval_image_transform(image_size),
        eval_transform=eval_image_transform(image_size),
        class_names=reference_classes,
    )


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
    """DomainBed's rotation: image by image with PIL's bicubic filter, zero fill (torchvision rotates
    tensors only bilinearly, which changes the pixels)."""
    rotated_NHW = np.stack(
        [
            np.asarray(TF.rotate(Image.fromarray(image), angle, interpolation=InterpolationMode.BICUBIC, fill=0))
            for image in images_N28x28.numpy()
        ]
    )
    return UInt8ImageDataset(torch.from_numpy(rotated_NHW)[:, None], digits_N.long())


def check_test_envs(test_envs: Sequence[Any], spec: DatasetSpec) -> list[int]:
    """``test_envs`` as a sorted list of domain indices, or a clear error."""
    names = ", ".join(f"{i}={name}" for i, name in enumerate(spec.environments))
    if isinstance(test_envs, int):
        test_envs = [test_envs]
    indices = []
    for env in test_envs:
        if isinstance(env, bool) or not isinstance(env, int) or not 0 <= env < len(spec.environments):
            raise AppError(
                f"test_envs={list(test_envs)} is out of range: {spec.name} has {len(spec.environments)} domains "
                f"({names}); pass indices among them, e.g. test_envs=[0] or test_envs=[0,2]."
            )
        indices.append(env)
    if len(set(indices)) >= len(spec.environments):
        raise AppError(
            f"test_envs={list(test_envs)} leaves no training domain: {spec.name} has {len(spec.environments)} "
            f"domains ({names}); hold out fewer of them."
        )
    return sorted(set(indices))
