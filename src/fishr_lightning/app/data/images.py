"""Opening one image file, the one place that decides what a broken file does (issue 19); any image
pipeline of the app (``ImageFolder``'s loader here, a faster decoder elsewhere) opens files through
``open_image`` or falls back to it.

- A file PIL cannot read (not an image, cut inside its header, a truncation PIL cannot complete)
  raises ``BrokenImageError``: one paragraph naming the file and the dataset folder to repair or
  download again, in the main process and in DataLoader workers alike (the app's top level takes the
  message out of the worker's traceback).
- A truncated JPEG that PIL can complete loads as DomainBed loads it (DomainBed sets
  ``ImageFile.LOAD_TRUNCATED_IMAGES = True``: a few TerraIncognita and DomainNet files are truncated;
  the missing rows are grey), with one warning naming it: once per run when the app sets
  ``TRUNCATED_IMAGES_ENV`` to a directory (the run's), where every process (main, DataLoader workers,
  a resumed run) marks the files it warned about; once per process otherwise.
- ``scan_images`` reads every file once, for ``data.skip_broken_images=true``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from PIL import Image, ImageFile

from fishr_lightning.app import AppError

# DomainBed's setting; open_image lowers it for a first attempt only, to learn which files are truncated.
ImageFile.LOAD_TRUNCATED_IMAGES = True

_WARNED_TRUNCATED: set[str] = set()
T = TypeVar("T")
# A directory shared by the processes of one run (inherited by DataLoader workers however they start).
TRUNCATED_IMAGES_ENV = "FISHR_TRUNCATED_IMAGES_DIR"


class BrokenImageError(AppError):
    """An image file that cannot be read; the message names the file and its dataset's folder."""


def broken_image_message(path: str | os.PathLike, dataset_folder: str | os.PathLike, reason: str, hint: str) -> str:
    return (
        f"The image {path} cannot be read ({reason}). It belongs to the dataset in {dataset_folder}: replace the "
        f"file, or download the dataset again{f' ({hint})' if hint else ''}; or pass data.skip_broken_images=true "
        "to leave unreadable images out of the run (one warning lists them; the records' args.skipped_images "
        "counts them)."
    )


def decode_checking_truncation(path: str | os.PathLike, decode: Callable[[str | os.PathLike], T]) -> tuple[T, bool]:
    """``(decode(path), truncated)``: ``decode`` run as DomainBed runs it (truncated JPEGs completed), and
    whether the file was truncated: a first attempt refuses truncation, a second, only for a truncated
    file, accepts it. ``decode`` must read the file itself (a failed decode cannot be resumed)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            return decode(path), False
        except OSError as error:
            if "truncated" not in str(error).lower():
                raise
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        return decode(path), True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def decode_image(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """``(RGB image, truncated)``: the whole file decoded; ``truncated`` when PIL had to complete it."""
    return decode_checking_truncation(path, decode_rgb)


def first_to_warn(path: str) -> bool:
    """Whether this process is the first of the run to meet the truncated file ``path``."""
    if path in _WARNED_TRUNCATED:
        return False
    _WARNED_TRUNCATED.add(path)
    shared = os.environ.get(TRUNCATED_IMAGES_ENV)
    if not shared:
        return True
    try:
        Path(shared).mkdir(parents=True, exist_ok=True)
        marker = Path(shared) / hashlib.md5(path.encode("utf-8")).hexdigest()
        with marker.open("x") as marker_file:  # exclusive creation: one process of the run wins
            marker_file.write(path)
    except FileExistsError:
        return False
    except OSError:
        return True  # no shared directory: warn in this process
    return True


def warn_truncated(paths: Sequence[str]) -> None:
    paths = [path for path in paths if first_to_warn(path)]
    if not paths:
        return
    warnings.warn(
        f"Truncated image file(s), loaded as DomainBed loads them (PIL's LOAD_TRUNCATED_IMAGES: the missing "
        f"part is grey): {', '.join(paths)}.",
        UserWarning,
        stacklevel=2,
    )


def read_image_file(
    path: str | os.PathLike,
    decode: Callable[[str | os.PathLike], T] = decode_rgb,
    dataset_folder: str | os.PathLike = "",
    hint: str = "",
) -> T:
    """``decode(path)`` (default: the RGB image) under DomainBed's truncated-image rule, or
    ``BrokenImageError`` naming the file and ``dataset_folder``; ``hint`` says how to download the dataset
    again (e.g. ``fishr-download pacs --data-dir /data``). A truncated file is warned about once."""
    try:
        result, truncated = decode_checking_truncation(path, decode)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = f"{type(error).__name__}: {error}"
        raise BrokenImageError(broken_image_message(path, dataset_folder or Path(path).parent, reason, hint)) from None
    if truncated:
        warn_truncated([str(path)])
    return result


def open_image(path: str | os.PathLike, dataset_folder: str | os.PathLike = "", hint: str = "") -> Image.Image:
    """The RGB image in ``path``, or ``BrokenImageError`` naming it and ``dataset_folder``."""
    return read_image_file(path, decode_rgb, dataset_folder, hint)


class ImageReader:
    """``open_image`` for one dataset folder, as the ``loader`` of torchvision's ``ImageFolder``
    (a class, not a closure, so that DataLoader workers started by spawn can unpickle it)."""

    def __init__(self, dataset_folder: str | os.PathLike, hint: str = "") -> None:
        self.dataset_folder = str(dataset_folder)
        self.hint = hint

    def __call__(self, path: str) -> Image.Image:
        return open_image(path, self.dataset_folder, self.hint)

    def read(self, path: str | os.PathLike, decode: Callable[[str | os.PathLike], T]) -> T:
        """``decode(path)`` with this folder's broken-file errors (the fast pipeline's reduced decode)."""
        return read_image_file(path, decode, self.dataset_folder, self.hint)


def scan_images(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(unreadable, truncated)`` among ``paths``, each file decoded once (``data.skip_broken_images``)."""
    unreadable, truncated = [], []
    for path in paths:
        try:
            _, was_truncated = decode_image(path)
        except Exception:  # what open_image reports as BrokenImageError
            unreadable.append(path)
            continue
        if was_truncated:
            truncated.append(path)
    return unreadable, truncated
