"""DomainBed's image-folder datasets (VLCS, PACS, OfficeHome, TerraIncognita, DomainNet, SVIRO; the user's own,
``dataset=image_folders``): one torchvision ``ImageFolder`` per domain (Spawrious: a list of files per domain,
``spawrious.py``) and DomainBed's transforms (the datamodule applies them per split,
so that only training domains are augmented), through one of two pipelines (``data.pipeline``):

- ``fast`` (the default, issue 20): items ``(path, class)``; the workers decode at a reduced DCT scale,
  crop and resize to uint8 (``fast_images.FastImageTransform``), the training device does the rest
  (``MultiDomainData.batch_transform``);
- ``domainbed``: items ``(PIL image, class)`` through DomainBed's PIL transforms, exactly."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from fishr_lightning.app import AppError
from fishr_lightning.app.data.fast_images import DeviceAugmentation, FastImageTransform
from fishr_lightning.app.data.images import ImageReader, scan_images, warn_truncated
from fishr_lightning.app.data.spawrious import SPAWRIOUS_CLASSES, spawrious_samples
from fishr_lightning.app.data.specs import DatasetSpec, MultiDomainData, Transform, data_error

PIPELINES = ("fast", "domainbed")
DECODERS = ("cpu", "device")
FINISHES = ("auto", "device", "workers")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_first: bool = False,
    random_crop: bool = True,
) -> Transform:
    """DomainBed's augmentation for training domains (hparam ``data_augmentation``); ``resize_first``: its
    WILDS datasets' (``WILDSDataset``), which resize to the square before the random crop (issue 28); without
    ``random_crop`` (Spawrious') a plain resize instead of the random resized crop."""
    return transforms.Compose(
        [
            *([transforms.Resize((image_size, image_size))] if resize_first else []),
            transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0))
            if random_crop
            else transforms.Resize((image_size, image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
            transforms.RandomGrayscale(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def check_pipeline(pipeline: str) -> str:
    if pipeline not in PIPELINES:
        raise AppError(
            f"data.pipeline={pipeline}: choose fast (reduced JPEG decode on the loader workers, augmentation on "
            "the training device; the default) or domainbed (DomainBed's PIL transforms, exactly)."
        )
    return pipeline


def check_decode(decode: str, pipeline: str) -> str:
    if decode not in DECODERS:
        raise AppError(
            f"data.decode={decode}: choose cpu (the loader workers decode every image; the default) or device "
            "(the training device decodes baseline JPEGs: nvjpeg on a GPU)."
        )
    if decode == "device" and pipeline != "fast":
        raise AppError(
            f"data.decode=device needs data.pipeline=fast (it is {pipeline}): DomainBed's PIL path decodes on the CPU."
        )
    return decode


def check_finish(finish: str, pipeline: str, decode: str) -> str:
    """``data.finish``: where the fast pipeline's device part runs (issue 25)."""
    if finish not in FINISHES:
        raise AppError(
            f"data.finish={finish}: choose auto (the loader workers on a CPU-only run, else the training device; "
            "the default), device (the training process after Lightning's batch transfer, on any device: a GPU "
            "run's code path, also on the CPU) or workers (per sample in the loader workers)."
        )
    if finish != "auto" and pipeline != "fast":
        raise AppError(
            f"data.finish={finish} needs data.pipeline=fast (it is {pipeline}): DomainBed's PIL path finishes "
            "every image in the loader workers."
        )
    if finish == "workers" and decode == "device":
        raise AppError(
            "data.finish=workers finishes every image in the loader workers, data.decode=device decodes JPEGs on "
            "the training device: choose data.decode=cpu, or data.finish=device (or auto) to decode on the device."
        )
    return finish


def set_image_transforms(
    data: MultiDomainData,
    image_size: int,
    augment: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> None:
    """``data``'s transforms for its pipeline (``data.pipeline``) at ``image_size``, ``mean`` and ``std``."""
    if data.pipeline == "fast":
        # Resizing first is the workers' work (FastImageTransform): such datasets' files stay there (WILDS' are PNGs).
        on_device = data.decode == "device" and not data.resize_first
        reader = data.image_reader
        data.eval_transform = FastImageTransform(image_size, augment=False, decode_on_device=on_device, reader=reader)
        random_crop = data.spec.random_crop
        data.train_transform = (
            FastImageTransform(
                image_size,
                augment=True,
                decode_on_device=on_device,
                reader=reader,
                resize_first=data.resize_first,
                random_crop=random_crop,
            )
            if augment
            else data.eval_transform
        )
        data.batch_transform = DeviceAugmentation(mean, std, output_size=image_size, reader=reader)
    else:
        data.eval_transform = eval_image_transform(image_size, mean, std)
        data.train_transform = (
            train_image_transform(image_size, mean, std, data.resize_first, data.spec.random_crop)
            if augment
            else data.eval_transform
        )
        data.batch_transform = None
    data.input_shape = (3, image_size, image_size)


def use_input_config(data: MultiDomainData, config: dict[str, Any], augment: bool) -> None:
    """The image transforms at a backbone's own input size, mean and std (timm's ``resolve_data_config``);
    DomainBed's augmentation otherwise unchanged. Datasets of tensors (MNIST) are left as they are."""
    if data.eval_transform is None:
        return
    channels, height, width = config["input_size"]
    if height != width:
        raise AppError(f"The backbone's input size {height}x{width} is not square; set backbone.image_size=...")
    set_image_transforms(data, height, augment, config["mean"], config["std"])


# -- loaders --------------------------------------------------------------------------------------


def load_image_folder_domains(
    spec: DatasetSpec,
    data_dir: Path,
    image_size: int,
    augment: bool,
    skip_broken_images: bool = False,
    pipeline: str = "fast",
    decode: str = "cpu",
    finish: str = "auto",
) -> MultiDomainData:
    check_pipeline(pipeline)
    check_decode(decode, pipeline)
    check_finish(finish, pipeline, decode)
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
    # Every file is opened by images.open_image: an unreadable one is an error naming it (issue 19).
    hint = f"fishr-download {spec.download_name} --data-dir {data_dir}" if spec.download_name else ""
    reader = ImageReader(root, hint=hint)
    for folder in spec.domain_folders:
        try:
            # The fast path opens each file in its transform (FastImageTransform, through the same reader),
            # to decode it at a reduced scale.
            domains.append(ImageFolder(str(root / folder), loader=str if pipeline == "fast" else reader))
        except (FileNotFoundError, OSError) as error:
            raise data_error(spec, data_dir, f"{root / folder} cannot be read as an image folder: {error}.") from None
    return image_domains(
        spec, domains, reference_classes, reader, image_size, augment, skip_broken_images, pipeline, decode, finish
    )


def image_domains(
    spec: DatasetSpec,
    domains: list[Any],
    class_names: list[str],
    reader: ImageReader,
    image_size: int,
    augment: bool,
    skip_broken_images: bool,
    pipeline: str,
    decode: str,
    finish: str,
    resize_first: bool = False,
) -> MultiDomainData:
    """``MultiDomainData`` of image datasets (``ImageFolder``, ``ImageFiles``) with the pipeline's transforms;
    ``resize_first``: DomainBed's WILDS transforms (the square resize before the random crop)."""
    skipped = skip_unreadable_images(domains) if skip_broken_images else []
    data = MultiDomainData(
        spec=spec,
        domains=domains,
        input_shape=(3, image_size, image_size),
        class_names=class_names,
        skipped_images=skipped,
        pipeline=pipeline,
        decode=decode,
        finish=finish,
        image_reader=reader,
        resize_first=resize_first,
    )
    set_image_transforms(data, image_size, augment)
    return data


class ImageFiles(Dataset):
    """``(image, label)`` for a list of ``(path, label)`` samples, as torchvision's ``ImageFolder`` gives
    them (the same ``samples``, ``imgs``, ``targets`` and ``loader``): a domain that is no folder tree (Spawrious'
    listed folders, WILDS' metadata rows)."""

    def __init__(self, samples: list[tuple[str, int]], loader: Any) -> None:
        self.samples = list(samples)
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.loader(path), label


def load_spawrious_domains(
    spec: DatasetSpec,
    data_dir: Path,
    image_size: int,
    augment: bool,
    skip_broken_images: bool = False,
    pipeline: str = "fast",
    decode: str = "cpu",
    finish: str = "auto",
) -> MultiDomainData:
    """One of Spawrious' six benchmarks (``spawrious.py``): its domains' files, DomainBed's transforms
    without the random crop."""
    check_pipeline(pipeline)
    check_decode(decode, pipeline)
    check_finish(finish, pipeline, decode)
    samples = spawrious_samples(spec, data_dir)
    reader = ImageReader(data_dir / spec.folder, hint=f"fishr-download {spec.download_name} --data-dir {data_dir}")
    loader = str if pipeline == "fast" else reader  # the fast path opens each file in its transform
    domains = [ImageFiles(domain, loader) for domain in samples]
    return image_domains(
        spec,
        domains,
        list(SPAWRIOUS_CLASSES),
        reader,
        image_size,
        augment,
        skip_broken_images,
        pipeline,
        decode,
        finish,
    )


def skip_unreadable_images(domains: list[ImageFolder]) -> list[str]:
    """Reads every image once and drops the unreadable ones from ``domains`` (before the splits are
    drawn); one warning lists them, one the truncated ones. Returns the paths dropped."""
    paths = [path for domain in domains for path, _ in domain.samples]
    unreadable, truncated = scan_images(paths)
    if truncated:
        warn_truncated(truncated)
    if unreadable:
        dropped = set(unreadable)
        for domain in domains:
            domain.samples = [sample for sample in domain.samples if sample[0] not in dropped]
            domain.imgs = domain.samples
            domain.targets = [target for _, target in domain.samples]
        warnings.warn(
            f"data.skip_broken_images=true: {len(unreadable)} unreadable image(s) left out of the run: "
            f"{', '.join(unreadable)}.",
            UserWarning,
            stacklevel=2,
        )
    return unreadable
