"""``fishr-download DATASET [DATASET ...] --data-dir DIR``: DomainBed's datasets from the public
sources DomainBed's ``scripts/download.py`` uses, laid out as the training app reads them."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from fishr_lightning.app import AppError

# DomainBed's Google Drive copies; drive.usercontent... with confirm=t skips the large-file warning page.
GOOGLE_DRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
VLCS_URL = GOOGLE_DRIVE.format("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8")  # VLCS.tar.gz
PACS_URL = GOOGLE_DRIVE.format("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd")  # PACS.zip (kfold/)
OFFICE_HOME_URL = GOOGLE_DRIVE.format("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC")  # OfficeHomeDataset_10072016/
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first mirror
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DOMAIN_NET_URLS = (
    "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/clipart.zip",
    "http://csr.bu.edu/ftp/visda/2019/multi-source/infograph.zip",
    "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/painting.zip",
    "http://csr.bu.edu/ftp/visda/2019/multi-source/quickdraw.zip",
    "http://csr.bu.edu/ftp/visda/2019/multi-source/real.zip",
    "http://csr.bu.edu/ftp/visda/2019/multi-source/sketch.zip",
)
# DomainBed removes images that appear in two DomainNet domains; it keeps the list in its repository.
DOMAIN_NET_DUPLICATES_URL = (
    "https://raw.githubusercontent.com/facebookresearch/DomainBed/main/domainbed/misc/domain_net_duplicates.txt"
)
TERRA_IMAGES_URL = "https://lilablobssc.blob.core.windows.net/caltechcameratraps/eccv_18_all_images_sm.tar.gz"
TERRA_LABELS_URL = "https://lilablobssc.blob.core.windows.net/caltechcameratraps/labels/caltech_camera_traps.json.zip"
TERRA_LABELS_FILE = "caltech_images_20210113.json"
TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CATEGORIES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
# DomainBed's download.py sources for SVIRO (its DomainBed subset, SVIRO_DOMAINBED/) and Spawrious (spawrious224/).
SVIRO_URL = "https://sviro.kl.dfki.de/?wpdmdl=1731"
SPAWRIOUS_URL = "https://www.dropbox.com/s/e40j553480h3f3s/spawrious224.tar.gz?dl=1"


def fetch(url: str, destination: Path) -> Path:
    """Download ``url`` to ``destination`` with a progress bar (the tests replace this function)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    with urllib.request.urlopen(url) as response, partial.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    partial.rename(destination)
    return destination


def extract(archive: Path, into: Path, remove: bool = True) -> None:
    if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")  # refuses absolute paths and ../ escapes
    elif archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)  # zipfile strips absolute paths and ../ itself
    else:
        raise ValueError(f"Unknown archive type: {archive}")
    if remove:
        archive.unlink()


def fetch_and_extract(url: str, archive: Path, into: Path) -> None:
    extract(fetch(url, archive), into)


def download_mnist(data_dir: Path) -> None:
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        archive = fetch(MNIST_URL + name + ".gz", raw / (name + ".gz"))
        with gzip.open(archive) as compressed, (raw / name).open("wb") as out:
            shutil.copyfileobj(compressed, out)


def download_vlcs(data_dir: Path) -> None:
    fetch_and_extract(VLCS_URL, data_dir / "VLCS.tar.gz", data_dir)  # extracts VLCS/


def download_pacs(data_dir: Path) -> None:
    fetch_and_extract(PACS_URL, data_dir / "PACS.zip", data_dir)
    (data_dir / "kfold").rename(data_dir / "PACS")


def download_office_home(data_dir: Path) -> None:
    fetch_and_extract(OFFICE_HOME_URL, data_dir / "office_home.zip", data_dir)
    (data_dir / "OfficeHomeDataset_10072016").rename(data_dir / "office_home")


def download_domain_net(data_dir: Path) -> None:
    root = data_dir / "domain_net"
    for url in DOMAIN_NET_URLS:
        fetch_and_extract(url, root / url.rsplit("/", 1)[-1], root)
    duplicates = fetch(DOMAIN_NET_DUPLICATES_URL, root / "duplicates.txt")
    for line in duplicates.read_text().splitlines():
        if line.strip():
            (root / line.strip()).unlink(missing_ok=True)
    duplicates.unlink()


def download_terra_incognita(data_dir: Path) -> None:
    """Camera-trap images of four locations and ten classes, sorted into ``location_<N>/<class>/``."""
    root = data_dir / "terra_incognita"
    fetch_and_extract(TERRA_IMAGES_URL, root / "terra_incognita_images.tar.gz", root)
    fetch_and_extract(TERRA_LABELS_URL, root / "caltech_camera_traps.json.zip", root)
    images_dir, labels_file = root / "eccv_18_all_images_sm", root / TERRA_LABELS_FILE
    labels = json.loads(labels_file.read_text())
    category_names = {category["id"]: category["name"] for category in labels["categories"]}
    categories_of_image: dict[str, list[str]] = {}
    for annotation in labels["annotations"]:
        categories_of_image.setdefault(annotation["image_id"], []).append(category_names[annotation["category_id"]])
    for image in labels["images"]:
        location = str(image["location"])
        if location not in TERRA_LOCATIONS:
            continue
        for category in categories_of_image.get(image["id"], []):
            if category in TERRA_CATEGORIES:
                destination = root / f"location_{location}" / category / image["file_name"]
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(images_dir / image["file_name"], destination)
    shutil.rmtree(images_dir)
    labels_file.unlink()


def download_sviro(data_dir: Path) -> None:
    fetch_and_extract(SVIRO_URL, data_dir / "sviro_grayscale_rectangle_classification.zip", data_dir)
    (data_dir / "SVIRO_DOMAINBED").rename(data_dir / "sviro")


def download_spawrious(data_dir: Path) -> None:
    fetch_and_extract(SPAWRIOUS_URL, data_dir / "spawrious224.tar.gz", data_dir)  # extracts spawrious224/


DOWNLOADERS: dict[str, Callable[[Path], None]] = {
    "colored_mnist": download_mnist,
    "rotated_mnist": download_mnist,
    "vlcs": download_vlcs,
    "pacs": download_pacs,
    "office_home": download_office_home,
    "terra_incognita": download_terra_incognita,
    "domain_net": download_domain_net,
    "sviro": download_sviro,
    # The six Spawrious benchmarks read one tree, fetched once (as colored_mnist and rotated_mnist share MNIST).
    **{
        f"spawrious_{kind}_{level}": download_spawrious
        for kind in ("o2o", "m2m")
        for level in ("easy", "medium", "hard")
    },
}


def download(names: list[str], data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    done: set[Callable[[Path], None]] = set()
    for name in names:
        downloader = DOWNLOADERS[name]
        if downloader in done:  # colored_mnist and rotated_mnist share MNIST
            continue
        print(f"Downloading {name} into {data_dir}")
        try:
            downloader(data_dir)
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as error:  # network, disk, archive
            raise AppError(
                f"Downloading {name} failed ({error}). Check the network access to its source and the free "
                f"space in {data_dir}, remove any partial files there, and run the command again."
            ) from None
        done.add(downloader)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fishr-download", description="Download DomainBed's datasets for the training app (python train.py)."
    )
    parser.add_argument(
        "datasets",
        nargs="+",
        choices=[*DOWNLOADERS, "all"],
        metavar="DATASET",
        help=f"one or more of: {', '.join(DOWNLOADERS)}, all",
    )
    parser.add_argument("--data-dir", required=True, type=Path, help="where to put them (the app's data_dir)")
    args = parser.parse_args(argv)
    names = list(DOWNLOADERS) if "all" in args.datasets else args.datasets
    try:
        download(names, args.data_dir.expanduser())
    except AppError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"Done. Train with: python train.py dataset={names[0]} data_dir={args.data_dir}")


if __name__ == "__main__":
    main()
