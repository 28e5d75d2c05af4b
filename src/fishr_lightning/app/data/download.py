"""``fishr-download DATASET [DATASET ...] --data-dir DIR``: DomainBed's datasets from the public
sources DomainBed's ``scripts/download.py`` uses, laid out as the training app reads them.

Downloads a user can trust (issue 28): a transfer that breaks off leaves ``<archive>.part`` beside its
target and the next attempt asks for the rest (an HTTP range request); failed attempts are retried with
exponential backoff, then the archive's next URL (a mirror) is tried; ``--from-archive FILE`` reads an
archive the user already has; each extracted tree is counted against the published number of images per
domain (``published.PUBLISHED_IMAGES``); ``--check`` counts an existing tree without downloading."""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fishr_lightning.app import AppError
from fishr_lightning.app.data.published import (
    MNIST_IMAGE_FILES,
    CountCheck,
    compare_counts,
    count_mnist_images,
    count_on_disk,
)
from fishr_lightning.app.data.specs import MNIST_DATASETS, DatasetSpec, dataset_spec


@dataclass(frozen=True)
class Archive:
    """One file to fetch: its name (also the name a ``--from-archive`` copy is matched by) and its URLs, tried
    in turn: DomainBed's source first, then any mirror of the same file."""

    name: str
    urls: tuple[str, ...]


# DomainBed's Google Drive copies; drive.usercontent... with confirm=t skips the large-file warning page.
GOOGLE_DRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
VLCS = Archive("VLCS.tar.gz", (GOOGLE_DRIVE.format("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"),))
PACS = Archive("PACS.zip", (GOOGLE_DRIVE.format("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"),))  # kfold/
OFFICE_HOME = Archive("office_home.zip", (GOOGLE_DRIVE.format("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"),))
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first mirror
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST = tuple(Archive(f"{name}.gz", (f"{MNIST_URL}{name}.gz",)) for name in MNIST_FILES)
DOMAIN_NET_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
DOMAIN_NET = tuple(
    Archive(path.rsplit("/", 1)[-1], (DOMAIN_NET_URL + path,))
    for path in (
        "groundtruth/clipart.zip",
        "infograph.zip",
        "groundtruth/painting.zip",
        "quickdraw.zip",
        "real.zip",
        "sketch.zip",
    )
)
# DomainBed removes images that appear in two DomainNet domains; it keeps the list in its repository.
DOMAIN_NET_DUPLICATES = Archive(
    "domain_net_duplicates.txt",
    ("https://raw.githubusercontent.com/facebookresearch/DomainBed/main/domainbed/misc/domain_net_duplicates.txt",),
)
TERRA_IMAGES = Archive(
    "eccv_18_all_images_sm.tar.gz",
    (
        "https://lilablobssc.blob.core.windows.net/caltechcameratraps/eccv_18_all_images_sm.tar.gz",
        # LILA's Google Cloud copy of the same file, which DomainBed's download script reads since 2024.
        "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/eccv_18_all_images_sm.tar.gz",
    ),
)
TERRA_LABELS = Archive(
    "caltech_camera_traps.json.zip",
    ("https://lilablobssc.blob.core.windows.net/caltechcameratraps/labels/caltech_camera_traps.json.zip",),
)
TERRA_LABELS_FILE = "caltech_images_20210113.json"
TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CATEGORIES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
# WILDS' archives (the `wilds` package's download_url, release 2.0), extracted where it extracts them (issue 28).
WILDS_ARCHIVES = {
    "camelyon17_v1.0": Archive(
        "camelyon17_v1.0.tar.gz",
        ("https://worksheets.codalab.org/rest/bundles/0xe45e15f39fb54e9d9e919556af67aabe/contents/blob/",),
    ),
    "fmow_v1.1": Archive(
        "fmow_v1.1.tar.gz",
        ("https://worksheets.codalab.org/rest/bundles/0xaec91eb7c9d548ebb15e1b5e60f966ab/contents/blob/",),
    ),
}

# DomainBed's download.py sources for SVIRO (its DomainBed subset, SVIRO_DOMAINBED/) and Spawrious (spawrious224/).
SVIRO = Archive("sviro_grayscale_rectangle_classification.zip", ("https://sviro.kl.dfki.de/?wpdmdl=1731",))
SPAWRIOUS = Archive("spawrious224.tar.gz", ("https://www.dropbox.com/s/e40j553480h3f3s/spawrious224.tar.gz?dl=1",))
SPAWRIOUS_BENCHMARKS = {
    f"spawrious_{kind}_{level}": f"Spawrious{kind.upper()}_{level}"
    for kind in ("o2o", "m2m")
    for level in ("easy", "medium", "hard")
}

# The datasets (DomainBed's class names) each ``fishr-download`` name provides: counted after the download
# and by --check.
DATASETS: dict[str, tuple[str, ...]] = {
    "colored_mnist": ("ColoredMNIST",),
    "rotated_mnist": ("RotatedMNIST",),
    "vlcs": ("VLCS",),
    "pacs": ("PACS",),
    "office_home": ("OfficeHome",),
    "terra_incognita": ("TerraIncognita",),
    "domain_net": ("DomainNet",),
    "wilds_camelyon": ("WILDSCamelyon",),
    "wilds_fmow": ("WILDSFMoW",),
    "sviro": ("SVIRO",),
    **{name: (dataset,) for name, dataset in SPAWRIOUS_BENCHMARKS.items()},
}
# What each dataset fetches (``--from-archive`` names), by its ``fishr-download`` name.
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "colored_mnist": MNIST,
    "rotated_mnist": MNIST,
    "vlcs": (VLCS,),
    "pacs": (PACS,),
    "office_home": (OFFICE_HOME,),
    "terra_incognita": (TERRA_IMAGES, TERRA_LABELS),
    "domain_net": (*DOMAIN_NET, DOMAIN_NET_DUPLICATES),
    "wilds_camelyon": (WILDS_ARCHIVES["camelyon17_v1.0"],),
    "wilds_fmow": (WILDS_ARCHIVES["fmow_v1.1"],),
    "sviro": (SVIRO,),
    **{name: (SPAWRIOUS,) for name in SPAWRIOUS_BENCHMARKS},
}

RETRIES = 5  # attempts after the first, per URL
BACKOFF_S = 2.0  # the wait before retry k is BACKOFF_S * 2**(k-1): 2, 4, 8, 16, 32 s
TIMEOUT_S = 60.0  # without a byte for this long, an attempt fails (and is retried)
CHUNK_BYTES = 1 << 20
# HTTP statuses worth another attempt at the same URL; any other error status moves on to the next URL.
TRANSIENT_STATUSES = (408, 425, 429, 500, 502, 503, 504)


class TransferError(Exception):
    """An attempt that may succeed if repeated (a dropped connection, a short body, a busy server)."""


@dataclass
class Transfer:
    """How one archive arrived: from ``origin`` (a URL or a local file), with ``fetched`` bytes over the
    network in all, range requests from the offsets ``resumed_at`` (bytes already in its ``.part`` file), after
    ``retries`` failed attempts."""

    archive: str
    origin: str
    fetched: int = 0
    resumed_at: list[int] = field(default_factory=list)
    retries: int = 0

    def describe(self) -> str:
        if self.origin.startswith(("http://", "https://")):
            notes = [f"{self.fetched:,} bytes received"]
            if self.resumed_at:
                notes.append("resumed at " + ", ".join(f"{offset:,}" for offset in self.resumed_at) + " bytes")
            if self.retries:
                notes.append(f"{self.retries} {'retry' if self.retries == 1 else 'retries'}")
            return f"{self.archive} from {self.origin} ({', '.join(notes)})"
        return f"{self.archive} from {self.origin}"


@dataclass
class Fetcher:
    """Fetches archives: a local copy (``local``: file name -> path) when the user gave one, else over HTTP
    with resume and retries. ``transfers`` records where each archive came from."""

    local: dict[str, Path] = field(default_factory=dict)
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S
    timeout_s: float = TIMEOUT_S
    sleep: Callable[[float], None] = time.sleep
    transfers: list[Transfer] = field(default_factory=list)

    def get(self, archive: Archive, destination: Path) -> tuple[Path, bool]:
        """``archive`` as a file: ``(path, downloaded)``; ``downloaded`` is false for the user's own copy,
        which is read and never removed."""
        if archive.name in self.local:
            self.transfers.append(Transfer(archive.name, f"the local file {self.local[archive.name]}"))
            return self.local[archive.name], False
        if destination.exists():  # fetched by an earlier run that stopped before extracting it
            self.transfers.append(Transfer(archive.name, f"{destination}, kept from an earlier run"))
            return destination, True
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".part")
        failures: list[str] = []
        for url in archive.urls:
            transfer = Transfer(archive.name, url)
            for attempt in range(self.retries + 1):
                if attempt:
                    self.sleep(self.backoff_s * 2 ** (attempt - 1))
                    transfer.retries += 1
                try:
                    self.transfer(url, partial, transfer)
                except TransferError as error:
                    failures.append(f"{url}: {error}")
                    continue
                except urllib.error.HTTPError as error:  # not worth repeating: try the next URL
                    failures.append(f"{url}: HTTP {error.code} {error.reason}")
                    break
                partial.replace(destination)
                self.transfers.append(transfer)
                return destination, True
        kept = f"; the {partial.stat().st_size:,} bytes received are kept in {partial}" if partial.exists() else ""
        raise AppError(
            f"{archive.name} could not be downloaded ({'; '.join(failures[-3:])}){kept}. Check the network access "
            f"to its source and run the command again: it resumes where it stopped. On a machine without access, "
            f"fetch {archive.name} elsewhere and pass it with --from-archive FILE."
        )

    def transfer(self, url: str, partial: Path, transfer: Transfer) -> None:
        """One attempt: the rest of ``url`` appended to ``partial`` (all of it if the server ignores the range
        request), counted in ``transfer``. Raises ``TransferError`` when it may be repeated."""
        start = partial.stat().st_size if partial.exists() else 0
        headers = {"User-Agent": "fishr-download"}
        if start:
            headers["Range"] = f"bytes={start}-"
            transfer.resumed_at.append(start)
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            if error.code == 416 and start:  # nothing left to send: complete if the server's size is ours
                if error.headers.get("Content-Range", "") == f"bytes */{start}":
                    return
                partial.unlink()
                raise TransferError(f"HTTP 416: {partial.name} does not match the file, starting again") from None
            if error.code in TRANSIENT_STATUSES:
                raise TransferError(f"HTTP {error.code} {error.reason}") from None
            raise
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            raise TransferError(str(getattr(error, "reason", error)) or type(error).__name__) from None
        with response:
            if response.status == 206:
                first, total = content_range(response.headers.get("Content-Range", ""))
                if first != start:
                    partial.unlink()
                    raise TransferError(f"the server sent bytes from {first}, not {start}; starting again")
            else:  # 200: the whole file
                start, total = 0, int(response.headers.get("Content-Length") or 0) or None
            received = 0
            try:
                with (
                    partial.open("ab" if start else "wb") as out,
                    tqdm(
                        total=total, initial=start, unit="B", unit_scale=True, desc=partial.name[: -len(".part")]
                    ) as bar,
                ):
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        received += len(chunk)
                        transfer.fetched += len(chunk)
                        bar.update(len(chunk))
            except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
                raise TransferError(f"the connection broke after {start + received:,} bytes ({error!r})") from None
        # http.client returns a short body without an error when the connection closes early.
        if total is not None and start + received != total:
            raise TransferError(f"the connection closed after {start + received:,} of {total:,} bytes")


def content_range(header: str) -> tuple[int, int | None]:
    """``bytes FIRST-LAST/TOTAL`` -> ``(FIRST, TOTAL)`` (``TOTAL`` ``None`` when the server writes ``*``)."""
    try:
        _, _, span = header.partition(" ")  # "bytes", then the span
        first_last, _, total = span.partition("/")
        return int(first_last.split("-")[0]), None if total == "*" else int(total)
    except ValueError:
        raise TransferError(f"unreadable Content-Range {header!r}") from None


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


# What a damaged archive raises: a cut gzip stream (EOFError, zlib.error), a cut or corrupt tar or zip.
DAMAGED_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)


def fetch_and_extract(fetcher: Fetcher, archive: Archive, destination: Path, into: Path) -> None:
    path, downloaded = fetcher.get(archive, destination)
    try:
        extract(path, into, remove=downloaded)
    except DAMAGED_ARCHIVE_ERRORS as error:
        raise damaged(archive, path, downloaded, error) from None


def damaged(archive: Archive, path: Path, downloaded: bool, error: Exception) -> AppError:
    with path.open("rb") as file:
        web_page = file.read(512).lstrip().lower().startswith((b"<!doctype html", b"<html"))
    if web_page:  # Google Drive answers so when a file's download quota is exhausted
        error = ValueError("the server sent a web page, not the archive; Google Drive does when its quota is spent")
    if downloaded:  # so that the next run downloads it afresh
        path.unlink(missing_ok=True)
        what = f"The downloaded {archive.name} is damaged ({type(error).__name__}: {error}); it was removed"
        todo = "Run the command again to download it afresh"
    else:
        what = f"The archive {path} is damaged ({type(error).__name__}: {error})"
        todo = f"Copy {archive.name} again from its source ({archive.urls[0]}) and pass the new copy"
    return AppError(f"{what}. {todo}, or pass a good copy with --from-archive FILE.")


def move_into_place(extracted: Path, target: Path) -> None:
    if target.exists():
        raise AppError(
            f"{target} already exists and its counts differ from the published ones (fishr-download --check "
            f"tells how); the fresh copy is in {extracted}. Move {target} away and run the command again."
        )
    extracted.rename(target)


def download_mnist(data_dir: Path, fetcher: Fetcher) -> None:
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for archive in MNIST:
        path, downloaded = fetcher.get(archive, raw / archive.name)
        try:
            with gzip.open(path) as compressed, (raw / archive.name.removesuffix(".gz")).open("wb") as out:
                shutil.copyfileobj(compressed, out)
        except DAMAGED_ARCHIVE_ERRORS as error:
            raise damaged(archive, path, downloaded, error) from None


def download_vlcs(data_dir: Path, fetcher: Fetcher) -> None:
    fetch_and_extract(fetcher, VLCS, data_dir / VLCS.name, data_dir)  # extracts VLCS/


def download_pacs(data_dir: Path, fetcher: Fetcher) -> None:
    fetch_and_extract(fetcher, PACS, data_dir / PACS.name, data_dir)
    move_into_place(data_dir / "kfold", data_dir / "PACS")


def download_office_home(data_dir: Path, fetcher: Fetcher) -> None:
    fetch_and_extract(fetcher, OFFICE_HOME, data_dir / OFFICE_HOME.name, data_dir)
    move_into_place(data_dir / "OfficeHomeDataset_10072016", data_dir / "office_home")


def download_domain_net(data_dir: Path, fetcher: Fetcher) -> None:
    root = data_dir / "domain_net"
    for archive in DOMAIN_NET:
        fetch_and_extract(fetcher, archive, root / archive.name, root)
    duplicates, downloaded = fetcher.get(DOMAIN_NET_DUPLICATES, root / DOMAIN_NET_DUPLICATES.name)
    for line in duplicates.read_text().splitlines():
        if line.strip():
            (root / line.strip()).unlink(missing_ok=True)
    if downloaded:
        duplicates.unlink()


def download_terra_incognita(data_dir: Path, fetcher: Fetcher) -> None:
    """Camera-trap images of four locations and ten classes, sorted into ``location_<N>/<class>/``."""
    root = data_dir / "terra_incognita"
    fetch_and_extract(fetcher, TERRA_IMAGES, root / TERRA_IMAGES.name, root)
    fetch_and_extract(fetcher, TERRA_LABELS, root / TERRA_LABELS.name, root)
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


def download_wilds(folder: str) -> Callable[[Path, Fetcher], None]:
    """WILDS' ``<dataset>_v<version>`` folder as the ``wilds`` package downloads it (10.7 GB for Camelyon17,
    53.9 GB for FMoW): its archive extracted into the folder."""

    def download(data_dir: Path, fetcher: Fetcher) -> None:
        archive = WILDS_ARCHIVES[folder]
        fetch_and_extract(fetcher, archive, data_dir / folder / archive.name, data_dir / folder)

    return download


def download_sviro(data_dir: Path, fetcher: Fetcher) -> None:
    fetch_and_extract(fetcher, SVIRO, data_dir / SVIRO.name, data_dir)
    move_into_place(data_dir / "SVIRO_DOMAINBED", data_dir / "sviro")


def download_spawrious(data_dir: Path, fetcher: Fetcher) -> None:
    fetch_and_extract(fetcher, SPAWRIOUS, data_dir / SPAWRIOUS.name, data_dir)  # extracts spawrious224/


DOWNLOADERS: dict[str, Callable[[Path, Fetcher], None]] = {
    "colored_mnist": download_mnist,
    "rotated_mnist": download_mnist,
    "vlcs": download_vlcs,
    "pacs": download_pacs,
    "office_home": download_office_home,
    "terra_incognita": download_terra_incognita,
    "domain_net": download_domain_net,
    "wilds_camelyon": download_wilds("camelyon17_v1.0"),
    "wilds_fmow": download_wilds("fmow_v1.1"),
    "sviro": download_sviro,
    # The six Spawrious benchmarks read one tree, fetched once (as colored_mnist and rotated_mnist share MNIST).
    **dict.fromkeys(SPAWRIOUS_BENCHMARKS, download_spawrious),
}


# -- counts against the published ones ------------------------------------------------------------


def check_tree(spec: DatasetSpec, data_dir: Path) -> tuple[CountCheck | None, list[int | None]]:
    """``spec``'s tree under ``data_dir`` counted against its published counts."""
    found = count_on_disk(spec, data_dir)
    if found is None:  # a dataset only its loader can count (imported here: it needs torch)
        from fishr_lightning.app.data.domains import load_domains

        try:
            found = [len(domain) for domain in load_domains(spec.name, data_dir).domains]
        except AppError:  # not there, or not readable: every domain counts as missing
            found = [None] * len(spec.environments)
    return compare_counts(spec, found), found


def count_report(spec: DatasetSpec, data_dir: Path, check: CountCheck | None, found: list[int | None]) -> list[str]:
    """The per-domain lines ``fishr-download`` prints, then what is wrong, if anything."""
    if check is None:
        return [f"{spec.name} in {data_dir / spec.folder}: {found} images per domain (no published counts)"]
    lines = [f"{spec.name} in {data_dir / spec.folder}, against {check.version}:"]
    for domain in check.domains:
        state = "ok" if domain.matches else ("MISSING" if domain.found is None else "DIFFERS")
        found_text = "-" if domain.found is None else f"{domain.found:,}"
        lines.append(f"  {domain.label:<28} {found_text:>9} / {domain.published:,}  {state}")
    if spec.name in MNIST_DATASETS:
        raw = data_dir / spec.folder / "raw"
        for file, n in count_mnist_images(raw).items():
            if n != MNIST_IMAGE_FILES[file]:
                lines.append(
                    f"  {raw / file}: " + ("missing" if n is None else f"{n:,} of {MNIST_IMAGE_FILES[file]:,} images")
                )
    return lines


def count_problem(spec: DatasetSpec, check: CountCheck, data_dir: Path) -> str:
    if all(domain.found is None for domain in check.domains):
        return f"{spec.name}: {data_dir / spec.folder} is missing"
    return f"{spec.name}: " + "; ".join(domain.describe() for domain in check.differing)


def counted(name: str, data_dir: Path) -> tuple[list[str], list[str]]:
    """The count lines and the problems (none: complete) of the datasets ``fishr-download name`` provides."""
    lines, problems = [], []
    for dataset in DATASETS[name]:
        spec = dataset_spec(dataset)
        result, found = check_tree(spec, data_dir)
        lines += count_report(spec, data_dir, result, found)
        if result is not None and not result.complete:
            problems.append(count_problem(spec, result, data_dir))
        elif result is None and None in found:
            problems.append(f"{spec.name}: {data_dir / spec.folder} lacks domains")
    return lines, problems


def check_datasets(names: Sequence[str], data_dir: Path) -> list[str]:
    """``fishr-download --check``: prints each tree's counts; returns the problems (empty: all complete)."""
    problems = []
    for name in dict.fromkeys(names):
        lines, problems_of_name = counted(name, data_dir)
        print("\n".join(lines))
        problems += [problem for problem in problems_of_name if problem not in problems]
    return problems


# -- the command ----------------------------------------------------------------------------------


def local_archives(paths: Sequence[Path], names: Sequence[str]) -> dict[str, Path]:
    """``--from-archive`` files by the archive name each stands for: its own file name, or, when the datasets
    named fetch a single archive, whatever its name."""
    wanted = {archive.name: archive for name in names for archive in ARCHIVES[name]}
    local = {}
    for path in paths:
        if not path.is_file():
            raise AppError(f"--from-archive {path}: there is no such file.")
        if path.name in wanted:
            local[path.name] = path
        elif len(wanted) == 1 and len(paths) == 1:
            local[next(iter(wanted))] = path
        else:
            raise AppError(
                f"--from-archive {path}: {', '.join(dict.fromkeys(names))} fetch(es) {', '.join(wanted)}; name the "
                "local copy as the archive it stands for."
            )
    return local


def download(names: Sequence[str], data_dir: Path, fetcher: Fetcher | None = None) -> None:
    """Fetches, extracts and counts each dataset; a dataset whose tree already has the published counts is
    left as it is. Raises ``AppError`` when a download fails or a tree's counts differ."""
    fetcher = fetcher or Fetcher()
    data_dir.mkdir(parents=True, exist_ok=True)
    done: set[Callable[[Path, Fetcher], None]] = set()
    for name in names:
        downloader = DOWNLOADERS[name]
        if downloader in done:  # colored_mnist and rotated_mnist share MNIST
            continue
        if not counted(name, data_dir)[1]:
            folders = ", ".join(dict.fromkeys(str(data_dir / dataset_spec(d).folder) for d in DATASETS[name]))
            print(f"{name}: {folders} already has the published counts; nothing to download")
            done.add(downloader)
            continue
        print(f"Downloading {name} into {data_dir}")
        first = len(fetcher.transfers)
        try:
            downloader(data_dir, fetcher)
        except OSError as error:  # the disk: full, read-only, ...
            raise AppError(
                f"Downloading {name} failed ({error}). Check the free space and the permissions in {data_dir}, "
                "and run the command again: downloads resume from their .part files."
            ) from None
        for transfer in fetcher.transfers[first:]:
            print(f"{name}: {transfer.describe()}")
        lines, problems = counted(name, data_dir)
        print("\n".join(lines))
        if problems:
            raise AppError(
                f"The extracted {'. '.join(problems)}. The archive may be incomplete or another release: run the "
                "command again after moving the dataset's folder away, or pass a complete copy with --from-archive "
                "FILE. The app trains on this tree as it is, with a warning."
            )
        done.add(downloader)


def main(argv: list[str] | None = None) -> None:
    """``fishr-download DATASET [DATASET ...] --data-dir DIR [--check] [--from-archive FILE] [--retries N]``:
    downloads (resuming, retrying, then trying mirrors) or, with ``--check``, only counts each dataset's tree
    against ``published.PUBLISHED_IMAGES``; exit status 1 with an ``error: ...`` line when a download fails or
    a domain is short, over-full or missing."""
    parser = argparse.ArgumentParser(
        prog="fishr-download",
        description="Download DomainBed's datasets for the training app (python train.py), resuming interrupted "
        "transfers, and check their numbers of images against the published ones.",
    )
    parser.add_argument(
        "datasets",
        nargs="+",
        choices=[*DOWNLOADERS, "all"],
        metavar="DATASET",
        help=f"one or more of: {', '.join(DOWNLOADERS)}, all",
    )
    parser.add_argument("--data-dir", required=True, type=Path, help="where to put them (the app's data_dir)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="count the images of each domain already in --data-dir against the published numbers, without "
        "downloading; exit status 1 when a domain is short, over or missing",
    )
    parser.add_argument(
        "--from-archive",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a local copy of an archive the dataset fetches (by its name, e.g. PACS.zip; any name when a single "
        "archive is needed); repeat for several",
    )
    parser.add_argument(
        "--retries", type=int, default=RETRIES, help=f"attempts after the first, per URL (default {RETRIES})"
    )
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error(f"--retries {args.retries}: give 0 (one attempt per URL) or more")
    names = list(DOWNLOADERS) if "all" in args.datasets else args.datasets
    data_dir = args.data_dir.expanduser()
    try:
        if args.check:
            problems = check_datasets(names, data_dir)
            if problems:
                raise AppError(
                    f"{'. '.join(problems)}. Download with `fishr-download {' '.join(names)} --data-dir "
                    f"{args.data_dir}`; the app trains on a tree as it is, with a warning."
                )
            return
        fetcher = Fetcher(local=local_archives(args.from_archive, names), retries=args.retries, backoff_s=BACKOFF_S)
        download(names, data_dir, fetcher)
    except AppError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"Done. Train with: python train.py dataset={names[0]} data_dir={args.data_dir}")


if __name__ == "__main__":
    main()
