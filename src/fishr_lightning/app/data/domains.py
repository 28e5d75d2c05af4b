"""``load_domains``: every domain of a dataset, by DomainBed's name, from the loader that knows it."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from fishr_lightning.app.data.image_folders import load_image_folder_domains, load_spawrious_domains
from fishr_lightning.app.data.mnist import load_mnist_domains
from fishr_lightning.app.data.published import DatasetCountWarning, compare_counts, differing_counts_warning
from fishr_lightning.app.data.specs import (
    MNIST_DATASETS,
    SPAWRIOUS_DATASETS,
    WILDS_DATASETS,
    MultiDomainData,
    data_error,
    dataset_spec,
)
from fishr_lightning.app.data.synthetic import SAMPLES_PER_DOMAIN, synthetic_domains
from fishr_lightning.app.data.wilds_datasets import load_wilds_domains


def warns_if_counts_differ(load: Callable[..., MultiDomainData]) -> Callable[..., MultiDomainData]:
    """``load`` and then one warning (from the first process of a DDP run) when the domains' sizes differ from
    the published ones (``published.PUBLISHED_IMAGES``, issue 28): a subset trains, but it is not the
    published dataset. A decorator, so that every loader ``load_domains`` dispatches to is checked."""

    @functools.wraps(load)
    def load_and_check(name: str, data_dir: str | os.PathLike | None, *args, **kwargs) -> MultiDomainData:
        data = load(name, data_dir, *args, **kwargs)
        check = compare_counts(data.spec, [len(domain) for domain in data.domains])
        if check is not None and not check.complete:
            rank_zero_warn(differing_counts_warning(check, Path(data_dir).expanduser()), category=DatasetCountWarning)
        return data

    return load_and_check


@warns_if_counts_differ
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
    files out of the image datasets (``MultiDomainData.skipped_images``); ``pipeline`` (``fast`` or
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
    if spec.name in WILDS_DATASETS:
        return load_wilds_domains(spec, data_dir, image_size, augment, skip_broken_images, pipeline, decode, finish)
    if spec.name in SPAWRIOUS_DATASETS:
        return load_spawrious_domains(spec, data_dir, image_size, augment, skip_broken_images, pipeline, decode, finish)
    return load_image_folder_domains(spec, data_dir, image_size, augment, skip_broken_images, pipeline, decode, finish)
