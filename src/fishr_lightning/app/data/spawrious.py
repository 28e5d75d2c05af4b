"""Spawrious' six benchmarks (Lynch et al., 2023), built as DomainBed's ``SpawriousBenchmark`` builds them
from ``spawrious224/`` (its tarball's layout: ``<0|1>/<background>/<breed>/*.png``, 3,168 images each):

- three domains: ``Test`` first (the two test groups, one after the other), then ``SC_group_1`` and
  ``SC_group_2``, the training domains, each breed on the backgrounds its benchmark correlates with it;
- labels in DomainBed's class list order: bulldog 0, corgi 1, dachshund 2, labrador 3;
- O2O (one-to-one): each breed on one background, 97 % of its images in ``SC_group_1`` (from folder 0),
  87 % in ``SC_group_2`` (from folder 1), the rest (96 and 412 images per breed) on a shared filler
  background; M2M (many-to-many): two breeds share two backgrounds, swapped between the training domains.
- the first ``n`` images of a folder are its first ``n`` files in sorted order. DomainBed takes them in
  ``os.listdir``'s order, which is the file system's (ext4's hash order, another on XFS or NFS): its
  96 / 412 filler subsets, and every domain's sample order (so its in/out splits), differ between machines.

The transforms are DomainBed's for Spawrious: no random crop (``DatasetSpec.random_crop``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from fishr_lightning.app.data.specs import DatasetSpec, data_error

SPAWRIOUS_CLASSES = ("bulldog", "corgi", "dachshund", "labrador")  # DomainBed's class_list: labels 0..3
# The order in which DomainBed pairs the breeds with a benchmark's four backgrounds (its combination dicts).
PAIRED_BREEDS = ("bulldog", "dachshund", "labrador", "corgi")
IMAGES_PER_FOLDER = 3168  # DomainBed's ``total``: the images of one background and breed in one folder
O2O_SHARES = (0.97, 0.87)  # of a breed's images on its own background, in SC_group_1 and SC_group_2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # DomainBed's CustomImageFolder keeps these (case-sensitive)


@dataclass(frozen=True)
class Benchmark:
    backgrounds: tuple[str, str, str, str]  # the training backgrounds, paired with PAIRED_BREEDS
    test_backgrounds: tuple[str, str, str, str]
    filler: str = ""  # O2O only: the background every breed shares in the training domains


# DomainBed's SpawriousO2O_* and SpawriousM2M_* classes (the Spawrious paper's Table 1).
BENCHMARKS = {
    "SpawriousO2O_easy": Benchmark(("desert", "jungle", "dirt", "snow"), ("dirt", "snow", "desert", "jungle"), "beach"),
    "SpawriousO2O_medium": Benchmark(
        ("mountain", "beach", "dirt", "jungle"), ("jungle", "dirt", "beach", "snow"), "desert"
    ),
    "SpawriousO2O_hard": Benchmark(
        ("jungle", "mountain", "snow", "desert"), ("mountain", "snow", "desert", "jungle"), "beach"
    ),
    "SpawriousM2M_easy": Benchmark(("desert", "mountain", "dirt", "jungle"), ("dirt", "jungle", "mountain", "desert")),
    "SpawriousM2M_medium": Benchmark(("beach", "snow", "mountain", "desert"), ("desert", "mountain", "beach", "snow")),
    "SpawriousM2M_hard": Benchmark(("dirt", "jungle", "snow", "beach"), ("snow", "beach", "dirt", "jungle")),
}
# M2M's second group: bulldog and dachshund swap their two backgrounds, labrador and corgi theirs.
M2M_SWAP = (1, 0, 3, 2)


class Source(NamedTuple):
    """One folder of a domain: ``folder`` under ``spawrious224/``, its images' ``label``, and ``limit``: its
    first ``limit`` files (sorted), or all of them (``None``)."""

    folder: str
    label: int
    limit: int | None


def breed_sources(
    folder: int, backgrounds: tuple[str, ...], breeds: tuple[str, ...], limit: int | None
) -> list[Source]:
    return [
        Source(f"{folder}/{background}/{breed}", SPAWRIOUS_CLASSES.index(breed), limit)
        for breed, background in zip(breeds, backgrounds)
    ]


def domain_sources(name: str) -> list[list[Source]]:
    """The folders of each domain of benchmark ``name`` (``Test``, ``SC_group_1``, ``SC_group_2``), in
    DomainBed's order: a domain's samples are its folders' images, one folder after the other."""
    benchmark = BENCHMARKS[name]
    total = IMAGES_PER_FOLDER
    if benchmark.filler:  # O2O: SC_group_g reads folder g
        train = []
        for group, share in enumerate(O2O_SHARES):
            own = int(share * total)
            train.append(
                breed_sources(group, benchmark.backgrounds, PAIRED_BREEDS, own)
                + breed_sources(group, (benchmark.filler,) * 4, PAIRED_BREEDS, total - own)
            )
        test = [
            source
            for group in (0, 1)
            for source in breed_sources(group, benchmark.test_backgrounds, PAIRED_BREEDS, None)
        ]
        return [test, *train]

    # M2M: everything from folder 0; the second group swaps the backgrounds within each pair of breeds.
    def swapped(backgrounds: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(backgrounds[index] for index in M2M_SWAP)

    train = [
        breed_sources(0, backgrounds, PAIRED_BREEDS, total)
        for backgrounds in (benchmark.backgrounds, swapped(benchmark.backgrounds))
    ]
    test = [
        source
        for backgrounds in (benchmark.test_backgrounds, swapped(benchmark.test_backgrounds))
        for source in breed_sources(0, backgrounds, PAIRED_BREEDS, None)
    ]
    return [test, *train]


def list_images(folder: Path, limit: int | None) -> list[str]:
    """The first ``limit`` image files of ``folder`` in sorted order (DomainBed: ``os.listdir``'s order)."""
    names = sorted(name for name in os.listdir(folder) if name.endswith(IMAGE_SUFFIXES))
    return [str(folder / name) for name in names[:limit]]


def spawrious_samples(spec: DatasetSpec, data_dir: Path) -> list[list[tuple[str, int]]]:
    """Each domain's ``(path, label)`` samples, or an error naming the missing folder and the layout."""
    root = data_dir / spec.folder
    if not root.is_dir():
        raise data_error(spec, data_dir, f"There is no directory {root}.")
    domains = []
    for sources in domain_sources(spec.name):
        samples = []
        for source in sources:
            folder = root / source.folder
            if not folder.is_dir():
                raise data_error(spec, data_dir, f"{root} lacks the folder {source.folder}.")
            samples += [(path, source.label) for path in list_images(folder, source.limit)]
        domains.append(samples)
    return domains
