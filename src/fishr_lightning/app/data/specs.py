"""What the app knows of each dataset without loading it (no torch import, so that ``fishr-collect``
can name domains): DomainBed's names, domains, class counts and on-disk layouts, the embedded
synthetic default, and the checks of user input that depend only on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fishr_lightning.app import AppError

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

Transform = Callable[[Any], "Tensor"]

SVIRO_VEHICLES = ("aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe")


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
    # DomainBed's training augmentation starts with RandomResizedCrop, except Spawrious' (a plain resize).
    random_crop: bool = True


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
        # DomainBed's SVIRO subset: 10 vehicle interiors (its sorted folder names), 7 classes.
        DatasetSpec("SVIRO", SVIRO_VEHICLES, 7, "sviro", "sviro", SVIRO_VEHICLES, (3,)),
    )
}

# Spawrious (Lynch et al., 2023): dog breeds on spurious backgrounds, read from spawrious224/ (spawrious.py);
# the combined test domain comes first, as in DomainBed, and its augmentation has no random crop.
SPAWRIOUS_DATASETS = {
    name: DatasetSpec(
        name,
        ("Test", "SC_group_1", "SC_group_2"),
        4,
        download_name,  # fishr-download spawrious_o2o_easy, ...: one download serves the six
        "spawrious224",
        input_shape=(3,),
        random_crop=False,
    )
    for name, download_name in (
        (f"Spawrious{kind}_{level}", f"spawrious_{kind.lower()}_{level}")
        for kind in ("O2O", "M2M")
        for level in ("easy", "medium", "hard")
    )
}

# dataset=image_folders: the user's own data_dir/<domain>/<class>/<image> (issue 28); its domains and classes
# are its folders', so its spec is read from data_dir (image_folders_spec).
IMAGE_FOLDERS = "ImageFolders"

SYNTHETIC_SPEC = DatasetSpec(
    name="Synthetic",
    environments=("-90%", "+90%", "+80%"),
    num_classes=2,
    download_name="",
    input_shape=(16,),  # synthetic.py: 8 shape, 2 colour and 6 noise dimensions
)

MNIST_DATASETS = {
    "ColoredMNIST": DatasetSpec("ColoredMNIST", ("+90%", "+80%", "-90%"), 2, "colored_mnist", "MNIST", (), (2, 28, 28)),
    "RotatedMNIST": DatasetSpec(
        "RotatedMNIST", ("0", "15", "30", "45", "60", "75"), 10, "rotated_mnist", "MNIST", (), (1, 28, 28)
    ),
}


# WILDS' Camelyon17 and FMoW, as DomainBed reads them (issue 28): domains from WILDS' metadata (``wilds_metadata.py``),
# the folder named as the ``wilds`` package names it (``<dataset>_v<version>``).
WILDS_DATASETS = {
    "WILDSCamelyon": DatasetSpec(
        "WILDSCamelyon", tuple(f"hospital_{i}" for i in range(5)), 2, "wilds_camelyon", "camelyon17_v1.0", (), (3,)
    ),
    "WILDSFMoW": DatasetSpec(
        "WILDSFMoW", tuple(f"region_{i}" for i in range(6)), 62, "wilds_fmow", "fmow_v1.1", (), (3,)
    ),
}
WILDS_LAYOUTS = {
    "WILDSCamelyon": "metadata.csv (one row per patch: patient, node, x_coord, y_coord, tumor, slide, center) and "
    "patches/patient_<patient>_node_<node>/patch_patient_<patient>_node_<node>_x_<x_coord>_y_<y_coord>.png",
    "WILDSFMoW": "rgb_metadata.csv (one row per image: split, category, country_code, ...), "
    "country_code_mapping.csv (alpha-3, region) and images/rgb_img_<row>.png",
}


def dataset_spec(name: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """The dataset ``name`` (DomainBed's class name); ``ImageFolders``' is read from ``data_dir``."""
    if name == IMAGE_FOLDERS:
        if data_dir is None:
            raise AppError(
                "dataset=image_folders reads its domains and classes from data_dir=PATH "
                "(PATH/<domain>/<class>/<image>), and none was given."
            )
        return image_folders_spec(Path(data_dir).expanduser())
    specs = {
        **IMAGE_FOLDER_DATASETS,
        **WILDS_DATASETS,
        **SPAWRIOUS_DATASETS,
        **MNIST_DATASETS,
        SYNTHETIC_SPEC.name: SYNTHETIC_SPEC,
    }
    if name not in specs:
        raise AppError(f"Unknown dataset name {name!r}; the app knows {sorted([*specs, IMAGE_FOLDERS])}.")
    return specs[name]


def holds_tensors(name: str) -> bool:
    """Whether dataset ``name`` is held as tensors (MNIST, the synthetic one): no image pipeline runs."""
    return name in MNIST_DATASETS or name == SYNTHETIC_SPEC.name


def subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def class_difference(folder: Path, classes: Sequence[str], reference: Sequence[str]) -> str:
    missing, extra = sorted(set(reference) - set(classes)), sorted(set(classes) - set(reference))
    parts = [f"lacks {missing}" if missing else "", f"has {extra} too" if extra else ""]
    return f"{folder} " + " and ".join(part for part in parts if part)


def image_folders_spec(root: Path) -> DatasetSpec:
    """The user's dataset ``root/<domain>/<class>/<image>``: domains and classes in sorted order, as
    DomainBed's ``MultipleEnvironmentImageFolder`` (sorted folder names) and torchvision's ``ImageFolder``
    (sorted class folders) number them; every domain must hold the same class folders."""
    layout = (
        f"dataset=image_folders reads data_dir={root} as {root}/<domain>/<class>/<image>: one folder per domain, "
        "the same class folders in each (docs: Your own dataset)."
    )
    if not root.is_dir():
        raise AppError(f"There is no directory {root}. {layout}")
    domains = subfolders(root)
    if len(domains) < 2:
        raise AppError(
            f"{root} holds {len(domains)} domain folder(s) {domains}; a run needs at least two (one to test on, "
            f"the others to train on). {layout}"
        )
    classes = {domain: tuple(subfolders(root / domain)) for domain in domains}
    # The class folders most domains share are the dataset's; the others are named (the first domain's on a tie).
    counts: dict[tuple[str, ...], int] = {}
    for names in classes.values():
        counts[names] = counts.get(names, 0) + 1
    reference = max(counts, key=lambda names: counts[names])  # the first of the most common, in domain order
    odd = [domain for domain in domains if classes[domain] != reference]
    if odd:
        details = "; ".join(class_difference(root / domain, classes[domain], reference) for domain in odd)
        raise AppError(
            f"Every domain must hold the same class folders (a class is its folder's name, numbered in sorted "
            f"order): {list(reference)} in {len(domains) - len(odd)} of the {len(domains)} domains, but {details}. "
            f"Rename, add or remove class folders so that they match. {layout}"
        )
    if not reference:
        raise AppError(
            f"The folders of {root} ({', '.join(domains)}) hold no class folders: is data_dir one domain's folder "
            f"rather than the dataset's? {layout}"
        )
    return DatasetSpec(IMAGE_FOLDERS, tuple(domains), len(reference), "", "", tuple(domains), (3,))


@dataclass
class MultiDomainData:
    """One dataset per domain, and how to turn its items into tensors for training and evaluation:
    ``train_transform``/``eval_transform`` per item (in the loader workers), then ``batch_transform``, when
    set, per batch on the training device (the fast image pipeline's second half). ``pipeline`` says which
    image pipeline built them (``fast``, ``domainbed``; ``tensors`` for datasets held as tensors), ``decode``
    where the fast pipeline decodes JPEGs (``cpu``: the loader workers; ``device``: the training device),
    ``finish`` where it runs ``batch_transform`` (``auto``: the loader workers on a CPU-only run, else the
    training device; ``device``; ``workers``: ``DomainBedDataModule.finishes_in_workers``)."""

    spec: DatasetSpec
    domains: list[Dataset]
    input_shape: tuple[int, ...]
    train_transform: Transform | None = None
    eval_transform: Transform | None = None
    class_names: list[str] = field(default_factory=list)
    skipped_images: list[str] = field(default_factory=list)  # left out by data.skip_broken_images=true
    batch_transform: Callable[[Any], Tensor] | None = None
    pipeline: str = "tensors"
    decode: str = "cpu"
    finish: str = "auto"
    # Opens the image folders' files (images.ImageReader: a broken file is an error naming it, issue 19);
    # the fast pipeline's transforms read through it too.
    image_reader: Any = None
    # DomainBed's WILDS transforms resize every image to the square before the training augmentation's
    # random crop too (``WILDSDataset``; Camelyon17's 96² patches): the crop is drawn on that square (issue 28).
    resize_first: bool = False


def expected_layout(spec: DatasetSpec, data_dir: Path) -> str:
    if spec.name in MNIST_DATASETS:
        return (
            f"{data_dir / 'MNIST' / 'raw'}/ holding MNIST's four idx files (train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte), as torchvision writes them"
        )
    if spec.name in WILDS_LAYOUTS:
        return f"{data_dir / spec.folder}/ as the `wilds` package lays it out: {WILDS_LAYOUTS[spec.name]}"
    if spec.name in SPAWRIOUS_DATASETS:
        return (
            f"{data_dir / spec.folder}/{{0,1}}/<background>/<breed>/<image>.png with the backgrounds beach, "
            "desert, dirt, jungle, mountain, snow and the breeds bulldog, corgi, dachshund, labrador, as "
            "Spawrious' spawrious224.tar.gz extracts"
        )
    if spec.name == IMAGE_FOLDERS:
        return f"{data_dir}/<domain>/<class>/<image> with the same class folders in each domain"
    domains = ", ".join(spec.domain_folders)
    return (
        f"{data_dir / spec.folder}/<domain>/<class>/<image> with the domain folders {domains} "
        f"and the same {spec.num_classes} class folders in each"
    )


def data_error(spec: DatasetSpec, data_dir: Path, problem: str) -> AppError:
    if spec.name == IMAGE_FOLDERS:  # the user's own: nothing to download
        return AppError(
            f"{problem} dataset=image_folders reads {expected_layout(spec, data_dir)} (docs: Your own dataset)."
        )
    return AppError(
        f"{problem} The {spec.name} dataset is read from {expected_layout(spec, data_dir)}. "
        f"Download it with `fishr-download {spec.download_name} --data-dir {data_dir}`, or point "
        f"data_dir=... at the directory that holds it."
    )


def check_test_envs(test_envs: Sequence[Any], spec: DatasetSpec) -> list[int]:
    """``test_envs`` as a sorted list of domain indices, or a clear error."""
    names = ", ".join(f"{i}={name}" for i, name in enumerate(spec.environments))
    if isinstance(test_envs, int):
        test_envs = [test_envs]
    if isinstance(test_envs, str):  # test_envs=each|leave_one_out: expanded by the app's sweeper (issue 30)
        raise AppError(
            f"test_envs={test_envs} is not a list of domain indices: {spec.name} has {len(spec.environments)} "
            f"domains ({names}); pass e.g. test_envs=[0] or test_envs=[0,2]. test_envs=each and "
            "test_envs=leave_one_out name the test-domain sets of a sweep: launch it with -m."
        )
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
