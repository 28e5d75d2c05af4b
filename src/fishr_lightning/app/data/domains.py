"""``load_domains``: every domain of a dataset, by DomainBed's name, from the loader that knows it."""

from __future__ import annotations

import os
from pathlib import Path

from fishr_lightning.app.data.image_folders import load_image_folder_domains, load_spawrious_domains
from fishr_lightning.app.data.mnist import load_mnist_domains
from fishr_lightning.app.data.specs import (
    MNIST_DATASETS,
    SPAWRIOUS_DATASETS,
    MultiDomainData,
    data_error,
    dataset_spec,
)
from fishr_lightning.app.data.synthetic import SAMPLES_PER_DOMAIN, synthetic_domains


def load_domains(
    name: str,
    data_dir: str | os.PathLike | None,
    image_size: int = 224,
    augment: bool = True,
    seed: int = 0,
    samples_per_domain: int | None = None,
    skip_broken_images: bool = False,
    pipeline: str = "fast",
    decode: str = "cpu",
    finish: str = "auto",
) -> MultiDomainData:
    """Every domain of dataset ``name`` (DomainBed's class name). ``seed`` drives the random parts of
    the generated and MNIST datasets (shuffle, label noise, colours) through a local generator;
    ``samples_per_domain`` sizes the synthetic dataset; ``skip_broken_images`` leaves unreadable image
    files out of the image-folder datasets (``MultiDomainData.skipped_images``); ``pipeline`` (``fast`` or
    ``domainbed``), ``decode`` (``cpu`` or ``device``) and ``finish`` (``auto``, ``device``, ``workers``) are the
    image folders' (``image_folders.py``)."""
    spec = dataset_spec(name, data_dir)  # ImageFolders: read from data_dir, or an error saying it needs one
    if spec.name == "Synthetic":
        return synthetic_domains(seed=seed, samples_per_domain=samples_per_domain or SAMPLES_PER_DOMAIN)
    if data_dir is None:
        raise data_error(spec, Path("<data_dir>"), f"{spec.name} needs data_dir=..., and none was given.")
    data_dir = Path(data_dir).expanduser()
    if spec.name in MNIST_DATASETS:
        return load_mnist_domains(spec, data_dir, seed)
    if spec.name in SPAWRIOUS_DATASETS:
        return load_spawrious_domains(spec, data_dir, image_size, augment, skip_broken_images, pipeline, decode, finish)
    return load_image_folder_domains(spec, data_dir, image_size, augment, skip_broken_images, pipeline, decode, finish)
