"""The fast image path (``data.pipeline=fast``, issue 20): DomainBed's transforms split between the loader
workers and the training device, with the same random draws.

- **Workers** (``FastImageTransform``, per file): open the image, draw DomainBed's random parameters with
  torchvision's own ``get_params`` in DomainBed's order (crop, flip, colour jitter, grayscale), decode the JPEG
  at the smallest DCT scale that still leaves the crop at least the output's size (PIL's ``draft``:
  libjpeg-turbo's scaled IDCT; TerraIncognita's 2048×1536 decodes to 512×384, though the entropy decoding
  stays whole), crop and resize to the output's size, and ship ``UInt8Images``: the uint8 pixels and the
  sample's parameters.
- **Device** (``DeviceAugmentation``, per batch, in the datamodule's ``on_after_batch_transfer``): flip,
  ``ColorJitter(0.3, 0.3, 0.3, 0.3)`` (each sample in its own random order of the four operations, as
  torchvision draws it), ``RandomGrayscale``, float conversion and normalisation, batched, each sample with
  its own parameters; the colour operations are kornia's torchvision-semantics kernels (``kornia.enhance``)
  and a hue shift written out (``shift_hue``: measured twice as fast as kornia's on the CPU).
- ``data.decode=device``: the workers ship a JPEG's bytes instead (``DeviceJpeg``) and the device decodes,
  crops and resizes it (``decode_on_device``); a file it cannot decode takes the workers' path there.
- The batches (``UInt8Images``, ``MixedImages``) are ``DeviceBatch`` objects, not tuples: Lightning moves them
  by their own ``to`` and neither walks into them nor converts them to half precision (issue 25).

Where this differs from DomainBed's PIL path, by design: the colour operations run in float on the device
(PIL rounds to uint8 after each one) and the resize starts from the DCT-reduced decode (``docs/app.md``
gives the measured pixel difference).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import transforms

from fishr_lightning.app.data.images import ImageReader, decode_rgb

# DomainBed's training augmentation (domainbed/datasets.py), the parameters of the fast path's draws.
CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default, which DomainBed keeps
FLIP_P = 0.5
JITTER = 0.3  # ColorJitter(0.3, 0.3, 0.3, 0.3)
GRAYSCALE_P = 0.1  # RandomGrayscale's default

# Columns of ``UInt8Images.params_NK``, one row per sample.
AUGMENT, FLIP, GRAY, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(7)
ORDER = slice(7, 11)  # the four colour operations' order, as torchvision's ``randperm(4)`` drew it
NUM_PARAMS = 11
DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes directly


class DeviceBatch:
    """Named tensors that Lightning handles as one object (issue 25). Not a tuple, mapping, dataclass or
    tensor, so Lightning's ``apply_to_collection`` neither walks into it nor converts it: the transfer
    (``move_data_to_device``, on every training, evaluation and BatchNorm batch) calls its ``to`` (any object
    with a ``to`` method is moved so), and the ``16-true``/``bf16-true`` plugins' ``convert_input``, which
    casts every floating tensor of a batch to half, leaves it alone: the draw parameters stay float32 (a
    bf16 box ``[1234, 777, 2047, 1533]`` is ``[1232, 776, 2048, 1536]``, a factor 1.234 is 1.234375), and
    JPEG bytes are no Python sequence (a ``list[bytes]`` cost a Python call per byte in each of those walks).

    ``to`` moves the fields named in ``moved`` to the device; the others stay on the host, where the device
    part reads them (which rows to augment, crop boxes, the JPEGs' bytes: ``decode_jpeg`` reads its input on
    the CPU whatever the device). The DataLoader's ``pin_memory`` pins the moved fields."""

    fields: tuple[str, ...] = ()
    moved: tuple[str, ...] = ()

    def _replace(self, **changes: Any) -> Any:
        values = {name: getattr(self, name) for name in self.fields}
        values.update(changes)
        return type(self)(**values)

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> Any:
        device = torch.device(device)
        # As Lightning's transfer: non-blocking except to the CPU and to MPS (pytorch/pytorch#83015).
        non_blocking = device.type not in ("cpu", "mps")
        return self._replace(**{name: getattr(self, name).to(device, non_blocking=non_blocking) for name in self.moved})

    def pin_memory(self, *args: Any) -> Any:
        return self._replace(**{name: getattr(self, name).pin_memory() for name in self.moved})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={describe_field(getattr(self, name))}" for name in self.fields)
        return f"{type(self).__name__}({shapes})"


def describe_field(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype}{list(value.shape)}@{value.device}"
    return f"<{len(value)} items>" if isinstance(value, list) else repr(value)


class UInt8Images(DeviceBatch):
    """What the fast path's workers ship: ``pixels`` uint8 ``[3, H, W]`` (``[N, 3, H, W]`` batched) and
    ``params`` float32 ``[NUM_PARAMS]`` (``[N, NUM_PARAMS]``): the device part's per-sample parameters,
    with ``params[AUGMENT] == 0`` for a sample only normalised (evaluation without augmentation). ``to``
    moves the pixels; the parameters stay on the host (``augment_batch`` sends their factors)."""

    fields = ("pixels", "params")
    moved = ("pixels",)

    def __init__(self, pixels: Tensor, params: Tensor) -> None:
        self.pixels = pixels
        self.params = params


def open_image(path: str | os.PathLike) -> Image.Image:
    """The one place the fast path opens an image file: lazily (only the header is read), so that
    ``draft`` can still choose a reduced decode. Not oriented by EXIF, as DomainBed's PIL path."""
    return Image.open(path)


def dct_scale(crop_width: float, crop_height: float, output_size: int) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that leaves a ``crop_width × crop_height`` region at least
    ``output_size`` pixels on each side, so that the resize still only shrinks."""
    for scale in DCT_SCALES:
        if crop_width / scale >= output_size and crop_height / scale >= output_size:
            return scale
    return 1


def draw_augmentation(width: int, height: int, random_crop: bool = True) -> tuple[tuple[int, int, int, int], Tensor]:
    """One sample's DomainBed augmentation, drawn from torch's global RNG exactly as DomainBed's
    ``transforms.Compose`` draws it (same calls, same order, so the same seed gives the same parameters):
    ``((top, left, crop_height, crop_width), params)`` on the original image's coordinates. Without
    ``random_crop`` (Spawrious' augmentation: a plain resize first), no crop is drawn: the whole image."""
    if random_crop:
        # get_params reads only the image's shape: a stride-0 view of one element stands for it.
        crop = transforms.RandomResizedCrop.get_params(
            torch.empty(1, 1, 1).expand(1, height, width), CROP_SCALE, CROP_RATIO
        )
    else:
        crop = (0, 0, height, width)
    flip = float(torch.rand(1) < FLIP_P)
    span = (1 - JITTER, 1 + JITTER)
    order, brightness, contrast, saturation, hue = transforms.ColorJitter.get_params(
        span, span, span, (-JITTER, JITTER)
    )
    gray = float(torch.rand(1) < GRAYSCALE_P)
    params = torch.tensor([1.0, flip, gray, brightness, contrast, saturation, hue, *order.tolist()])
    return crop, params


NO_AUGMENTATION = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0])


def reduced_resized_crop(image: Image.Image, box: tuple[float, float, float, float], output_size: int) -> Image.Image:
    """``box`` (left, top, right, bottom, original coordinates) of ``image`` resized to ``output_size²``
    (bilinear, PIL's antialiased filter as torchvision's), decoded at ``dct_scale`` when ``image`` is a JPEG."""
    left, top, right, bottom = box
    width, height = image.size
    scale = dct_scale(right - left, bottom - top, output_size)
    if scale > 1:
        drafted = image.draft("RGB", (width // scale, height // scale))  # None unless a JPEG
        if drafted is not None:
            scale = width / drafted[1][2]  # the reduction libjpeg will apply
        else:
            scale = 1
    if image.mode != "RGB":
        image = image.convert("RGB")  # greyscale, CMYK, palette PNG: as DomainBed's ImageFolder loader
    size = (output_size, output_size)
    if scale == 1:
        # Crop, then resize: exactly torchvision's ``resized_crop``/``Resize`` on the full image.
        return image.crop(tuple(int(v) for v in box)).resize(size, Image.Resampling.BILINEAR)
    return image.resize(size, Image.Resampling.BILINEAR, box=tuple(v / scale for v in box))


def to_uint8_chw(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class FastImageTransform:
    """The workers' part of the fast path: an image file's path → ``UInt8Images`` at ``output_size²``, or,
    with ``decode_on_device`` and a file that ``decodes_on_device`` accepts, ``DeviceJpeg``: the file's bytes,
    crop box and parameters, for the training device to decode (nvjpeg), crop and resize.

    Args:
        output_size: the square side of the output (DomainBed: 224).
        augment: draw DomainBed's training augmentation (from torch's global RNG, which the datamodule
            seeds per sample); False: evaluation's ``Resize((size, size))`` only.
        decode_on_device: leave baseline RGB and greyscale JPEGs to the device (``data.decode=device``);
            other files (PNG, CMYK, progressive JPEGs) are still decoded here.
        resize_first: decode the whole file and resize it to ``output_size²`` before the augmentation, whose
            crop is then drawn on that square, as DomainBed's WILDS datasets (``Resize`` before
            ``RandomResizedCrop``: the same crop boxes and the same PIL crop and resize; issue 28).
        random_crop: the augmentation's random resized crop (DomainBed's); False: the whole image resized
            (Spawrious' augmentation).
    """

    def __init__(
        self,
        output_size: int,
        augment: bool,
        decode_on_device: bool = False,
        reader: ImageReader | None = None,
        resize_first: bool = False,
        random_crop: bool = True,
    ) -> None:
        self.output_size = output_size
        self.augment = augment
        self.decode_on_device = decode_on_device
        self.reader = reader or ImageReader("")
        self.resize_first = resize_first
        self.random_crop = random_crop

    def __call__(self, path: str | os.PathLike) -> UInt8Images | DeviceJpeg:
        # Both reads go through the dataset's reader: a broken file is an error naming it, a truncated
        # one loads as DomainBed loads it, with a warning (issue 19).
        if self.resize_first:
            size = (self.output_size, self.output_size)
            image = self.reader.read(path, lambda opened: decode_rgb(opened).resize(size, Image.Resampling.BILINEAR))
        else:
            image = self.reader.read(path, open_image)  # the header only
        width, height = image.size
        if self.augment:
            (top, left, crop_height, crop_width), params = draw_augmentation(width, height, self.random_crop)
            box = (left, top, left + crop_width, top + crop_height)
        else:
            box, params = (0, 0, width, height), NO_AUGMENTATION.clone()
        if self.resize_first:  # the square is decoded already: crop and resize it as torchvision's resized_crop
            return UInt8Images(to_uint8_chw(reduced_resized_crop(image, box, self.output_size)), params)
        if self.decode_on_device and decodes_on_device(image):
            image.close()
            return DeviceJpeg(Path(path).read_bytes(), torch.tensor(box, dtype=torch.long), params, str(path))

        def decode(path: str | os.PathLike) -> Image.Image:
            # The header already opened serves the first attempt; a retry (a truncated file) opens it again.
            nonlocal image
            opened, image = (image, None) if image is not None else (open_image(path), None)
            return reduced_resized_crop(opened, box, self.output_size)

        return UInt8Images(to_uint8_chw(self.reader.read(path, decode)), params)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, augment={self.augment}, "
            f"decode_on_device={self.decode_on_device}, random_crop={self.random_crop}"
            f"{', resize_first=True' if self.resize_first else ''})"
        )


# -- decoding on the training device (data.decode=device) ----------------------------------------------


class DeviceJpeg(NamedTuple):
    """A JPEG left to the device, as a worker ships it: the file's ``data``, its crop ``box`` (left, top,
    right, bottom; int64 ``[4]``, original coordinates), the sample's ``params`` and the file's ``path`` (for
    the fallback's warnings and errors). ``collate_images`` gathers them into one ``MixedImages``."""

    data: bytes
    box: Tensor
    params: Tensor
    path: str


class MixedImages(DeviceBatch):
    """A batch with ``DeviceJpeg`` samples (``collate_images``): the ``pixels`` of the samples the workers
    decoded (rows ``pixel_rows`` of the batch), the JPEGs of the others (rows ``jpeg_rows``): their bytes one
    after another in ``jpegs`` (uint8, ``jpeg_sizes`` bytes each), their ``boxes`` (int64 ``[J, 4]``) and
    ``paths``; every sample's ``params``. ``to`` moves the pixels; the rest stays on the host."""

    fields = ("pixels", "pixel_rows", "jpegs", "jpeg_sizes", "jpeg_rows", "boxes", "params", "paths")
    moved = ("pixels",)

    def __init__(
        self,
        pixels: Tensor,
        pixel_rows: Tensor,
        jpegs: Tensor,
        jpeg_sizes: Tensor,
        jpeg_rows: Tensor,
        boxes: Tensor,
        params: Tensor,
        paths: list[str],
    ) -> None:
        self.pixels = pixels
        self.pixel_rows = pixel_rows
        self.jpegs = jpegs
        self.jpeg_sizes = jpeg_sizes
        self.jpeg_rows = jpeg_rows
        self.boxes = boxes
        self.params = params
        self.paths = paths


def decodes_on_device(image: Image.Image) -> bool:
    """Whether a file (opened lazily) goes to the device's decoder: a baseline (not progressive) JPEG in RGB
    (YCbCr) or greyscale. nvjpeg decodes neither CMYK nor, in its batched hardware path, progressive
    files; PNGs are no JPEGs: those stay on the workers."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and not image.info.get("progressive")


def collate_images(samples: list[tuple[Any, ...]]) -> Any:
    """The loaders' ``collate_fn``: ``default_collate``, except for the fast path's images (the samples'
    first element): ``UInt8Images`` samples become one ``UInt8Images`` batch, a batch with ``DeviceJpeg``
    samples one ``MixedImages``; the rest of each sample is collated by ``default_collate``."""
    first = [sample[0] for sample in samples]
    if not any(isinstance(image, (UInt8Images, DeviceJpeg)) for image in first):
        return default_collate(samples)
    rest = default_collate([sample[1:] for sample in samples])
    params = torch.stack([image.params for image in first])
    if not any(isinstance(image, DeviceJpeg) for image in first):
        return [UInt8Images(torch.stack([image.pixels for image in first]), params), *rest]
    jpeg_rows = [row for row, image in enumerate(first) if isinstance(image, DeviceJpeg)]
    pixel_rows = [row for row, image in enumerate(first) if not isinstance(image, DeviceJpeg)]
    pixels = [first[row].pixels for row in pixel_rows]
    jpegs = [first[row] for row in jpeg_rows]
    images = MixedImages(
        pixels=torch.stack(pixels) if pixels else torch.empty(0, 3, 0, 0, dtype=torch.uint8),
        pixel_rows=torch.tensor(pixel_rows, dtype=torch.long),
        # One buffer for the batch: one shared-memory segment from a worker, one tensor for Lightning.
        jpegs=torch.frombuffer(bytearray(b"".join(jpeg.data for jpeg in jpegs)), dtype=torch.uint8),
        jpeg_sizes=torch.tensor([len(jpeg.data) for jpeg in jpegs], dtype=torch.long),
        jpeg_rows=torch.tensor(jpeg_rows, dtype=torch.long),
        boxes=torch.stack([jpeg.box for jpeg in jpegs]),
        params=params,
        paths=[jpeg.path for jpeg in jpegs],
    )
    return [images, *rest]


def decode_jpegs(data: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Each JPEG of ``data`` (uint8, on the CPU) decoded to RGB on ``device``, ``None`` for a file the decoder
    refuses (truncated, corrupt: ``decode_jpeg`` raises, nvjpeg and libjpeg-turbo alike)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(jpegs: list[Tensor]) -> list[Tensor]:
        if device.type == "cuda":
            # nvJPEG's batched hardware decode writes its outputs, which torch's caching allocator may hand out
            # as soon as they are freed on the caller's stream, before the kernels already queued there have
            # run: it overwrites memory they still read (pytorch/vision PR 9606; torchcodec's fix, PR 1634,
            # is the same host barrier). Draining the stream first costs no wall time: the decode ends in a
            # host synchronisation anyway. (Issue 25.)
            torch.cuda.current_stream(device).synchronize()
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))

    try:
        return list(decode(data))
    except RuntimeError:
        pass  # one file fails the whole batch (torchvision): find which, one by one
    decoded: list[Tensor | None] = []
    for jpeg in data:
        try:
            decoded.append(decode([jpeg])[0])
        except RuntimeError:
            decoded.append(None)
    return decoded


def decode_on_host(
    path: str, box: tuple[int, int, int, int], output_size: int, reader: ImageReader | None = None
) -> Tensor:
    """The workers' decode of one file (``FastImageTransform``'s, through the dataset's ``reader``): a
    truncated JPEG completed as DomainBed completes it, with the warning naming it; an unreadable one an
    error naming it and its dataset. uint8 ``[3, output_size, output_size]`` on the CPU."""
    reader = reader or ImageReader("")
    image = reader.read(path, lambda opened: reduced_resized_crop(open_image(opened), box, output_size))
    return to_uint8_chw(image)


def decode_on_device(
    images: MixedImages, output_size: int, device: torch.device, reader: ImageReader | None = None
) -> UInt8Images:
    """``MixedImages`` → ``UInt8Images`` on ``device``: the JPEGs decoded there (``torchvision.io.decode_jpeg``:
    nvjpeg on a GPU, libjpeg-turbo on the CPU; no EXIF orientation, as DomainBed's loader), each cropped and
    resized to ``output_size²`` (bilinear, antialiased as PIL's), the workers' pixels put in their rows. A
    file the decoder refuses is decoded as the workers decode (``decode_on_host``, through ``reader``)."""
    from torchvision.transforms.v2 import functional as F

    data = list(torch.split(images.jpegs, images.jpeg_sizes.tolist()))
    size = [output_size, output_size]
    crops = []
    for image, path, box in zip(decode_jpegs(data, device), images.paths, images.boxes.tolist()):
        left, top, right, bottom = box
        if image is None:
            crops.append(decode_on_host(path, (left, top, right, bottom), output_size, reader).to(device))
        else:
            crops.append(F.resized_crop(image, top, left, bottom - top, right - left, size, antialias=True))
    count = len(images.params)
    pixels = torch.empty(count, 3, output_size, output_size, dtype=torch.uint8, device=device)
    pixels[images.jpeg_rows.to(device)] = torch.stack(crops)
    if len(images.pixel_rows):
        pixels[images.pixel_rows.to(device)] = images.pixels.to(device, non_blocking=True)
    return UInt8Images(pixels, images.params)


class DeviceAugmentation:
    """The device part of the fast path: ``UInt8Images`` (a batch) → normalised float32 ``[N, 3, H, W]``,
    each sample augmented with its own parameters (rows with ``params[AUGMENT] == 0`` only normalised).

    Args:
        mean: the normalisation's mean per channel (ImageNet's for DomainBed's backbones).
        std: its standard deviation per channel.
        output_size: the images' side, for the JPEGs it decodes itself (``MixedImages``, ``data.decode=device``).
        reader: the dataset's ``ImageReader``, for the files the device cannot decode (``decode_on_host``).
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], output_size: int = 224, reader: ImageReader | None = None
    ) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.output_size = output_size
        self.reader = reader

    def __call__(self, images: UInt8Images | MixedImages) -> Tensor:
        if isinstance(images, MixedImages):
            images = decode_on_device(images, self.output_size, images.pixels.device, self.reader)
        x_NCHW = images.pixels.float().div_(255)  # ToTensor
        params_NK = images.params.detach().cpu()  # which samples go where: a few hundred numbers (on the host)
        if params_NK[:, AUGMENT].any():
            x_NCHW = augment_batch(x_NCHW, params_NK)
        mean = torch.tensor(self.mean, device=x_NCHW.device, dtype=x_NCHW.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x_NCHW.device, dtype=x_NCHW.dtype).view(1, -1, 1, 1)
        return x_NCHW.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std}, output_size={self.output_size})"


def augment_batch(x_NCHW: Tensor, params_NK: Tensor) -> Tensor:
    """Flip, colour jitter (each sample's four operations in its own order) and grayscale of the rows of
    ``x_NCHW`` (floats in [0, 1]) whose ``params_NK[:, AUGMENT]`` is set, in DomainBed's order; returns the
    batch (``x_NCHW`` itself, changed in place, unless every row is augmented). ``params_NK`` lives on the CPU.

    The augmented rows are gathered once, sorted by their order of the four colour operations, so that the
    samples sharing an order (24 possible) form one contiguous slice that each operation processes at once,
    each sample with its own factor; each slice is written back once. (Gathering the rows of each operation at
    each position instead copies every image 8 times: measured 20 % of the device part on the CPU.) A batch
    whose rows are all augmented and already in that order (one sample, as a CPU-only run's loader workers
    finish them) is neither gathered nor scattered: the copies measured 1.3 of 3.1 ms per 224² sample there."""
    from kornia.enhance import (
        adjust_brightness_accumulative,
        adjust_contrast_with_mean_subtraction,
        adjust_saturation_with_gray_subtraction,
    )

    # torchvision's ColorJitter indices: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    operations = (
        (adjust_brightness_accumulative, BRIGHTNESS),
        (adjust_contrast_with_mean_subtraction, CONTRAST),
        (adjust_saturation_with_gray_subtraction, SATURATION),
        (shift_hue, HUE),
    )
    device = x_NCHW.device
    rows_A = params_NK[:, AUGMENT].nonzero().squeeze(1)
    order_A4 = params_NK[rows_A, ORDER].long()
    order_key_A = order_A4 @ torch.tensor([64, 16, 4, 1])
    order_key_A, by_order = order_key_A.sort(stable=True)
    rows_A, params_AK, order_A4 = rows_A[by_order], params_NK[rows_A[by_order]], order_A4[by_order]
    in_place = len(rows_A) == len(x_NCHW) and bool((rows_A == torch.arange(len(rows_A))).all())
    if in_place:
        y_ACHW = x_NCHW
    else:
        rows_on_device = rows_A.to(device, non_blocking=True)
        y_ACHW = x_NCHW[rows_on_device]  # one copy of the augmented images, sorted by colour order
    factors_AK = params_AK.to(device=device, dtype=x_NCHW.dtype, non_blocking=True)
    flip_A, gray_A = params_AK[:, FLIP] > 0, params_AK[:, GRAY] > 0
    gray_weights = torch.tensor([0.299, 0.587, 0.114], device=device, dtype=x_NCHW.dtype).view(1, 3, 1, 1)
    _, counts = torch.unique_consecutive(order_key_A, return_counts=True)
    for count, first in zip(counts.tolist(), torch.cumsum(counts, 0).sub(counts).tolist()):
        group = slice(first, first + count)
        g_GCHW = flip_rows(y_ACHW[group], flip_A[group])
        for index in order_A4[first].tolist():
            operation, column = operations[index]
            # kornia's three blends clamp to [0, 1] (torchvision's float semantics); a hue shift stays inside.
            g_GCHW = operation(g_GCHW, factors_AK[group, column])
        grays = gray_A[group].nonzero().squeeze(1)
        if len(grays) == count:
            g_GCHW = (g_GCHW * gray_weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        elif len(grays):
            grays = grays.to(device, non_blocking=True)
            g_GCHW[grays] = (g_GCHW[grays] * gray_weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        if count == len(y_ACHW):
            y_ACHW = g_GCHW.contiguous()  # one group: nothing to write back
        else:
            y_ACHW[group] = g_GCHW
    if in_place:
        return y_ACHW
    x_NCHW[rows_on_device] = y_ACHW
    return x_NCHW


def flip_rows(x_NCHW: Tensor, flip_N: Tensor) -> Tensor:
    """``x_NCHW`` with the rows where ``flip_N`` (bool, CPU) is set mirrored left to right: a new tensor when
    all are, else ``x_NCHW`` changed in place."""
    if bool(flip_N.all()):
        return x_NCHW.flip(-1)
    if bool(flip_N.any()):
        flipped = flip_N.nonzero().squeeze(1).to(x_NCHW.device, non_blocking=True)
        x_NCHW[flipped] = x_NCHW[flipped].flip(-1)
    return x_NCHW


_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B in the HSV → RGB formula below


def shift_hue(x_NCHW: Tensor, factor_N: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (RGB → HSV, hue + ``factor`` turns mod 1, → RGB) of each sample by its own
    factor, for floats in [0, 1]. Written out because kornia's ``adjust_hue`` (the same maths) measured
    5.5 ms per 224² image on one CPU core against 2.5 ms here, half of the device part's time when the
    device is the CPU; ``tests/test_app_fast_images.py`` checks it against torchvision's.

    Hue in sixths: ``h6 = (next − previous) / (max − min) + 2·k`` for the channel ``k`` that holds the
    maximum (R first on ties, as torchvision); back to RGB with ``c = max − (max − min)·clamp(min(t, 4 − t),
    0, 1)``, ``t = (h6 + offset_c) mod 6`` (Wikipedia, "HSV to RGB alternative")."""
    r, g, b = x_NCHW.unbind(1)
    v = x_NCHW.amax(1)
    d = v - x_NCHW.amin(1)
    h6 = torch.where(r == v, g - b, torch.where(g == v, (b - r).add_(d, alpha=2), (r - g).add_(d, alpha=4)))
    h6.div_(torch.where(d == 0, torch.ones_like(d), d)).add_(6 * factor_N.view(-1, 1, 1))
    offsets = torch.tensor(_CHANNEL_OFFSETS, device=x_NCHW.device, dtype=x_NCHW.dtype).view(1, 3, 1, 1)
    t = h6.unsqueeze(1) + offsets
    t.sub_(torch.floor(t / 6).mul_(6))
    return torch.minimum(t, 4 - t).clamp_(0, 1).mul_(-d.unsqueeze(1)).add_(v.unsqueeze(1))
