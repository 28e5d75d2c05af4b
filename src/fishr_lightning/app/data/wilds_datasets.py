"""DomainBed's WILDS datasets (``WILDSCamelyon``, ``WILDSFMoW``; issue 28) as the app's domains: the samples
that ``wilds_metadata`` reads from WILDS' metadata files, through the image folders' pipelines."""

from __future__ import annotations

from pathlib import Path

from fishr_lightning.app.data.image_folders import ImageFiles, check_decode, check_finish, check_pipeline, image_domains
from fishr_lightning.app.data.images import ImageReader
from fishr_lightning.app.data.specs import DatasetSpec, MultiDomainData
from fishr_lightning.app.data.wilds_metadata import CAMELYON_CLASSES, FMOW_CATEGORIES, wilds_domains


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
    domains = [ImageFiles(samples, loader) for samples in samples_per_domain]
    class_names = CAMELYON_CLASSES if spec.name == "WILDSCamelyon" else list(FMOW_CATEGORIES)
    return image_domains(
        spec, domains, class_names, reader, image_size, augment, skip_broken_images, pipeline, decode, finish,
        resize_first=True,
    )  # fmt: skip
