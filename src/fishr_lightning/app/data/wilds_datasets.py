"""DomainBed's WILDS datasets (``WILDSCamelyon``, ``WILDSFMoW``; issue 28) as the app's domains: the samples
that ``wilds_metadata`` reads from WILDS' metadata files, through the image folders' pipelines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fishr_lightning.app.data.image_folders import (
    check_decode,
    check_finish,
    check_pipeline,
    set_image_transforms,
    skip_unreadable_images,
)
from fishr_lightning.app.data.images import ImageReader
from fishr_lightning.app.data.specs import DatasetSpec, MultiDomainData
from fishr_lightning.app.data.wilds_metadata import CAMELYON_CLASSES, FMOW_CATEGORIES, Samples, wilds_domains


class ImageList(Dataset):
    """One domain's ``samples`` (``(path, label)``), each item ``(loader(path), label)``: torchvision
    ``ImageFolder``'s interface (``samples``, ``imgs``, ``targets``) for files listed by metadata."""

    def __init__(self, samples: Samples, loader: Callable[[str], Any]) -> None:
        self.samples = samples
        self.imgs = samples
        self.targets = [label for _, label in samples]
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.loader(path), label


def load_wilds_domains(
    spec: DatasetSpec,
    data_dir: Path,
    image_size: int,
    augment: bool,
    skip_broken_images: bool = False,
    pipeline: str = "fast",
    decode: str = "cpu",
    finish: str = "auto",
) -> MultiDomainData:
    """A WILDS dataset's domains through the image folders' pipelines (``image_folders.py``), with DomainBed's
    WILDS transforms: its training augmentation resizes to the square before the random crop."""
    check_pipeline(pipeline)
    check_decode(decode, pipeline)
    check_finish(finish, pipeline, decode)
    samples_per_domain = wilds_domains(spec, data_dir)
    reader = ImageReader(data_dir / spec.folder, hint=f"fishr-download {spec.download_name} --data-dir {data_dir}")
    # The fast pipeline opens each file in its transform (FastImageTransform, through the same reader).
    loader = str if pipeline == "fast" else reader
    domains = [ImageList(samples, loader) for samples in samples_per_domain]
    data = MultiDomainData(
        spec=spec,
        domains=domains,
        input_shape=(3, image_size, image_size),
        class_names=CAMELYON_CLASSES if spec.name == "WILDSCamelyon" else list(FMOW_CATEGORIES),
        skipped_images=skip_unreadable_images(domains) if skip_broken_images else [],
        pipeline=pipeline,
        decode=decode,
        finish=finish,
        image_reader=reader,
        resize_first=True,
    )
    set_image_transforms(data, image_size, augment)
    return data
