"""The published number of images of each domain of every dataset the app reads, and the comparison of a
tree on disk with them (issue 28): ``fishr-download`` verifies what it extracted, ``fishr-download --check``
verifies an existing tree, and the app warns once when it trains on a tree whose counts differ (a subset is
legitimate for tests and quick experiments). No torch import: ``fishr-download --check`` counts files.

A dataset is added with one row of ``PUBLISHED_IMAGES`` (its ``DatasetSpec.name``: its environments, in
DomainBed's order, with their numbers of images, and where the numbers come from). Image-folder datasets
(``DatasetSpec.domain_folders``) and MNIST are counted on disk by ``count_on_disk``; any other dataset by
loading it (``domains.load_domains``), unless a counter is added to ``count_on_disk``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fishr_lightning.app import AppError
from fishr_lightning.app.data.specs import MNIST_DATASETS, WILDS_DATASETS, DatasetSpec

# The files ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS, compared lower-cased), written out
# so that counting needs no torch import; tests/test_app_download.py checks that they are torchvision's.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

MNIST_IMAGE_FILES = {"train-images-idx3-ubyte": 60_000, "t10k-images-idx3-ubyte": 10_000}  # LeCun et al.
MNIST_IMAGE_BYTES = 28 * 28
MNIST_HEADER_BYTES = 16  # idx3: magic, count, rows, columns (4 bytes each)


def dealt(total: int, environments: Sequence[str]) -> dict[str, int]:
    """``total`` images dealt over ``environments`` as DomainBed deals MNIST: ``images[i::len(environments)]``."""
    n = len(environments)
    return {name: len(range(i, total, n)) for i, name in enumerate(environments)}


@dataclass(frozen=True)
class PublishedImages:
    """The published images per environment (keys: the ``DatasetSpec.environments``, in their order),
    ``source`` (the paper or file the numbers come from), and ``releases``: other published versions of the
    same dataset that a tree may equally match (name: images per environment)."""

    images: dict[str, int]
    source: str
    releases: dict[str, dict[str, int]] = field(default_factory=dict)

    def versions(self) -> dict[str, dict[str, int]]:
        return {self.source: self.images, **self.releases}


# One row per dataset, keyed by DomainBed's class name (``DatasetSpec.name``). To add a dataset: its
# environments in DomainBed's order, each with its published number of images, and the source of the
# numbers (a paper's table, DomainBed's files); a second published version goes into ``releases``.
PUBLISHED_IMAGES: dict[str, PublishedImages] = {
    "ColoredMNIST": PublishedImages(
        dealt(70_000, MNIST_DATASETS["ColoredMNIST"].environments),
        "MNIST's 70,000 images (60,000 training, 10,000 test; LeCun et al. 1998), dealt as DomainBed deals them",
    ),
    "RotatedMNIST": PublishedImages(
        dealt(70_000, MNIST_DATASETS["RotatedMNIST"].environments),
        "MNIST's 70,000 images (60,000 training, 10,000 test; LeCun et al. 1998), dealt as DomainBed deals them",
    ),
    # DomainBed's own list of its VLCS copy (domainbed/misc/vlcs_files.txt, counted per domain): 10,729 in
    # all, the number of its paper (Gulrajani & Lopez-Paz, ICLR 2021, section 4).
    "VLCS": PublishedImages(
        {"C": 1_415, "L": 2_656, "S": 3_282, "V": 3_376}, "DomainBed's domainbed/misc/vlcs_files.txt (10,729 images)"
    ),
    "PACS": PublishedImages(
        {"A": 2_048, "C": 2_344, "P": 1_670, "S": 3_929}, "Li et al., ICCV 2017 (PACS: 9,991 images)"
    ),
    "OfficeHome": PublishedImages(
        {"A": 2_427, "C": 4_365, "P": 4_439, "R": 4_357}, "Venkateswara et al., CVPR 2017 (Office-Home: 15,588 images)"
    ),
    # DomainBed's paper counts 24,788 images (per location as the MIRO authors, who trained on that copy, list
    # them: github.com/khanrc/miro/issues/9). The labels DomainBed's download script has read since 2021 (and
    # `fishr-download` reads: caltech_images_20210113.json) give 24,330 (the same issue; DomainBed issue #58).
    "TerraIncognita": PublishedImages(
        {"L100": 4_879, "L38": 9_767, "L43": 4_020, "L46": 6_122},
        "DomainBed's paper (Gulrajani & Lopez-Paz, ICLR 2021: 24,788 images)",
        releases={
            "LILA's labels of 2021-01-13, which fishr-download reads (24,330 images)": {
                "L100": 4_741,
                "L38": 9_736,
                "L43": 3_970,
                "L46": 5_883,
            }
        },
    ),
    # Peng et al., ICCV 2019, less the images DomainBed removes (domainbed/misc/domain_net_duplicates.txt:
    # 704, 1,596, 3,493, 0, 2,380, 1,258 per domain): 586,575, the number of DomainBed's paper.
    "DomainNet": PublishedImages(
        {"clip": 48_129, "info": 51_605, "paint": 72_266, "quick": 172_500, "real": 172_947, "sketch": 69_128},
        "Peng et al., ICCV 2019, less DomainBed's duplicates (586,575 images)",
    ),
}


@dataclass(frozen=True)
class DomainCount:
    """One environment's images on disk (``found``; ``None``: its folder or file is missing) against the
    published number."""

    environment: str
    label: str  # how the user finds it on disk: the domain folder, or the environment's name
    found: int | None
    published: int

    @property
    def matches(self) -> bool:
        return self.found == self.published

    def describe(self) -> str:
        if self.found is None:
            return f"{self.label} is missing (published: {self.published:,} images)"
        difference = "short by" if self.found < self.published else "over by"
        return (
            f"{self.label} has {self.found:,} images, published {self.published:,} "
            f"({difference} {abs(self.found - self.published):,})"
        )


@dataclass(frozen=True)
class CountCheck:
    """A tree's counts against the published version they are closest to (``version``)."""

    spec: DatasetSpec
    version: str
    domains: list[DomainCount]

    @property
    def complete(self) -> bool:
        return all(domain.matches for domain in self.domains)

    @property
    def differing(self) -> list[DomainCount]:
        return [domain for domain in self.domains if not domain.matches]


def domain_labels(spec: DatasetSpec) -> list[str]:
    if spec.domain_folders:
        return [f"{name} ({folder})" for name, folder in zip(spec.environments, spec.domain_folders)]
    return list(spec.environments)


def compare_counts(spec: DatasetSpec, found: Sequence[int | None]) -> CountCheck | None:
    """``found`` (images per environment, in the spec's order) against the published version it is closest
    to; ``None`` for a dataset without published counts (the synthetic one, a user's own)."""
    published = PUBLISHED_IMAGES.get(spec.name)
    if published is None:
        return None

    def distance(images: dict[str, int]) -> int:
        return sum(abs((n or 0) - images[name]) for name, n in zip(spec.environments, found))

    version, images = min(published.versions().items(), key=lambda item: distance(item[1]))
    domains = [
        DomainCount(name, label, n, images[name])
        for name, label, n in zip(spec.environments, domain_labels(spec), found)
    ]
    return CountCheck(spec, version, domains)


def count_image_folder(folder: Path) -> int | None:
    """The images ImageFolder finds in ``folder``: files with an image extension anywhere under its class
    folders (not beside them); ``None`` if there is no such folder."""
    if not folder.is_dir():
        return None
    count = 0
    for class_folder in os.scandir(folder):
        if class_folder.is_dir():
            for _, _, files in os.walk(class_folder.path, followlinks=True):
                count += sum(name.lower().endswith(IMAGE_EXTENSIONS) for name in files)
    return count


def count_mnist_images(raw: Path) -> dict[str, int | None]:
    """The images each MNIST images file holds: the idx header's count, or fewer if the file is cut short."""
    counts: dict[str, int | None] = {}
    for name in MNIST_IMAGE_FILES:
        path = raw / name
        if not path.is_file():
            counts[name] = None
            continue
        with path.open("rb") as file:
            header = file.read(MNIST_HEADER_BYTES)
        declared = int.from_bytes(header[4:8], "big") if len(header) == MNIST_HEADER_BYTES else 0
        counts[name] = min(declared, max(path.stat().st_size - MNIST_HEADER_BYTES, 0) // MNIST_IMAGE_BYTES)
    return counts


def count_on_disk(spec: DatasetSpec, data_dir: Path) -> list[int | None] | None:
    """Images per environment of ``spec``'s tree under ``data_dir`` without loading it (``None`` for a missing
    domain); ``None`` when this dataset cannot be counted without loading it."""
    if spec.name in MNIST_DATASETS:
        files = count_mnist_images(data_dir / spec.folder / "raw")
        if any(n is None for n in files.values()):
            return [None] * len(spec.environments)
        return list(dealt(sum(n or 0 for n in files.values()), spec.environments).values())
    if spec.domain_folders:
        return [count_image_folder(data_dir / spec.folder / folder) for folder in spec.domain_folders]
    if spec.name in WILDS_DATASETS:  # the files each domain's metadata lists that exist (torch-free)
        from fishr_lightning.app.data.wilds_metadata import count_wilds_images

        try:
            return count_wilds_images(spec, data_dir)
        except AppError:  # no metadata: every domain missing
            return [None] * len(spec.environments)
    return None


def differing_counts_warning(check: CountCheck, data_dir: Path) -> str:
    """The app's one warning for a tree whose counts differ from the published ones."""
    differences = "; ".join(domain.describe() for domain in check.differing)
    return (
        f"The {check.spec.name} tree in {data_dir / check.spec.folder} differs from the published counts "
        f"({check.version}): {differences}. Training on it as it is (a subset is fine for tests and quick "
        f"experiments, not for DomainBed's numbers); `fishr-download --check {check.spec.download_name} "
        f"--data-dir {data_dir}` checks it, `fishr-download {check.spec.download_name} --data-dir {data_dir}` "
        "downloads it again."
    )


class DatasetCountWarning(UserWarning):
    """The app trains on a tree whose numbers of images differ from the published ones."""
