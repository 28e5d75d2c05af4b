"""The fast image pipeline (issue 20) against DomainBed's PIL path: the same evaluation tensors within 2/255
on average for every kind of image the datasets hold, the same augmentation parameters drawn from the same
distributions, each sample its own, and batches that depend on the seed and step only."""

from __future__ import annotations

import itertools
import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from data_factories import IMAGE_KINDS, write_image_of_kind, write_pacs
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning_utilities.core.apply_func import apply_to_collection
from test_app_images import cut
from test_app_train import records, run_app
from torchvision.datasets.folder import pil_loader

from fishr_lightning.app import AppError
from fishr_lightning.app.data import datamodule as datamodule_module
from fishr_lightning.app.data.datamodule import DomainBedDataModule, default_num_workers
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.fast_images import (
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAY,
    HUE,
    NUM_PARAMS,
    ORDER,
    SATURATION,
    DeviceAugmentation,
    DeviceJpeg,
    FastImageTransform,
    MixedImages,
    UInt8Images,
    augment_batch,
    collate_images,
    dct_scale,
    decodes_on_device,
    draw_augmentation,
    open_image,
    shift_hue,
)
from fishr_lightning.app.data.image_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_image_transform,
    train_image_transform,
)
from fishr_lightning.app.data.images import TRUNCATED_IMAGES_ENV, BrokenImageError

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def fast_path(path, size: int, augment: bool) -> torch.Tensor:
    """Workers' part then device part, on the CPU: one normalised ``[3, size, size]`` tensor."""
    images = FastImageTransform(size, augment)(path)
    batch = UInt8Images(images.pixels[None], images.params[None])
    return DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD)(batch)[0]


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` of two normalised tensors, in units of 1/255 of the [0, 1] image."""
    return ((a - b) * STD).abs() * 255


# 640×480 decodes at 1/2 for evaluation (480 / 2 >= 224), 227×227 (PACS) at full size.
@pytest.mark.parametrize(("kind", "size"), [(kind, (640, 480)) for kind in IMAGE_KINDS] + [("rgb", (227, 227))])
def test_evaluation_tensors_equal_domainbeds_within_2_of_255_on_every_kind_of_image(tmp_path, kind, size):
    path = write_image_of_kind(tmp_path / "image", kind, *size)
    reference = eval_image_transform(224)(pil_loader(path))  # DomainBed: PIL, no EXIF orientation
    difference = pixel_difference(fast_path(path, 224, augment=False), reference)
    assert difference.mean() <= 2.0, (kind, float(difference.mean()))
    assert difference.max() <= 16.0, (kind, float(difference.max()))  # local, at sharp edges
    if size == (227, 227):
        assert difference.max() <= 1.0  # no reduced decode: the same resize, only float rounding


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_the_same_seed_draws_domainbeds_augmentation_of_every_kind_of_image(tmp_path, kind):
    """With torch's RNG in the same state, the fast path draws the parameters DomainBed's transforms draw
    (crop, flip, jitter, grayscale, in that order), so the augmented images match closely; only the
    colour operations' arithmetic differs (float on the device, uint8 in PIL)."""
    path = write_image_of_kind(tmp_path / "image", kind, 300, 260)
    for seed in range(4):
        torch.manual_seed(seed)
        reference = train_image_transform(224)(pil_loader(path))
        torch.manual_seed(seed)
        difference = pixel_difference(fast_path(path, 224, augment=True), reference)
        assert difference.mean() <= 4.0, (kind, seed, float(difference.mean()))


def test_the_reduced_decode_leaves_the_crop_at_least_the_output_size():
    assert dct_scale(2048, 1536, 224) == 4 and dct_scale(1434, 1075, 224) == 4
    assert dct_scale(600, 450, 224) == 2 and dct_scale(447, 450, 224) == 1 and dct_scale(227, 227, 224) == 1
    assert dct_scale(4000, 3000, 224) == 8 and dct_scale(100, 100, 224) == 1


# -- the parameters' distributions: DomainBed's, from an independent re-implementation -----------------


def domainbed_draws(n: int, width: int, height: int, seed: int) -> dict[str, np.ndarray]:
    """DomainBed's augmentation parameters as torchvision documents them, drawn with numpy:
    RandomResizedCrop(scale=(0.7, 1), ratio=(3/4, 4/3)) (10 tries of area × U(scale), aspect = exp(U(log
    ratio)), else the centre crop), flip with p=0.5, ColorJitter(0.3, 0.3, 0.3, 0.3) (factors U(0.7, 1.3),
    hue U(-0.3, 0.3), a uniform random order), RandomGrayscale(p=0.1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        for _ in range(10):
            area = width * height * rng.uniform(0.7, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                break
        else:
            w, h = width, height  # the ratio (4:3) is inside the range: the whole image
            top, left = 0, 0
        rows.append(
            [top, left, h, w, rng.random() < 0.5, rng.random() < 0.1, *rng.uniform(0.7, 1.3, 3), rng.uniform(-0.3, 0.3)]
            + list(rng.permutation(4))
        )
    return columns(np.array(rows, dtype=np.float64))


def columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    names = ["top", "left", "height", "width", "flip", "gray", "brightness", "contrast", "saturation", "hue"]
    draws = {name: rows[:, i] for i, name in enumerate(names)}
    draws["order"] = rows[:, 10:14] @ np.array([64, 16, 4, 1])  # one integer per permutation
    return draws


def fast_path_draws(n: int, width: int, height: int, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    rows = []
    for _ in range(n):
        (top, left, h, w), params = draw_augmentation(width, height)
        p = params.tolist()
        rows.append([top, left, h, w, p[FLIP], p[GRAY], p[BRIGHTNESS], p[CONTRAST], p[SATURATION], p[HUE], *p[ORDER]])
    return columns(np.array(rows, dtype=np.float64))


def two_sample_ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    pooled = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), pooled, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), pooled, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_augmentation_parameters_follow_domainbeds_distributions():
    """Two-sample Kolmogorov-Smirnov test per parameter (fixed seeds, so deterministic) at α = 0.001:
    ``D <= 1.95·sqrt((n + m) / (n·m))``; the flip and grayscale rates and the 24 orders' frequencies too."""
    n, width, height = 3000, 2048, 1536  # TerraIncognita's size; 4:3, so some crops need a second try
    ours, theirs = fast_path_draws(n, width, height, seed=0), domainbed_draws(n, width, height, seed=0)
    bound = 1.95 * math.sqrt(2 / n)
    for name in ("top", "left", "height", "width", "brightness", "contrast", "saturation", "hue", "order"):
        assert two_sample_ks_statistic(ours[name], theirs[name]) <= bound, name
    assert ours["flip"].mean() == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / n))
    assert ours["gray"].mean() == pytest.approx(0.1, abs=4 * math.sqrt(0.09 / n))
    assert len(np.unique(ours["order"])) == 24
    for name in ("brightness", "contrast", "saturation"):
        assert 0.7 <= ours[name].min() and ours[name].max() <= 1.3
    assert -0.3 <= ours["hue"].min() and ours["hue"].max() <= 0.3
    crop_area = ours["height"] * ours["width"] / (width * height)
    assert crop_area.min() >= 0.7 - 1e-3 and crop_area.max() <= 1.0


# -- the device part: torchvision's operations, each sample with its own parameters --------------------


def torchvision_reference(x_NCHW: torch.Tensor, params_NK: torch.Tensor) -> torch.Tensor:
    """Sample by sample, torchvision's tensor kernels in DomainBed's order (flip, the four jitter
    operations in the sample's order, grayscale)."""
    out = []
    for x, p in zip(x_NCHW, params_NK.tolist()):
        if p[FLIP]:
            x = TF.hflip(x)
        for index in p[ORDER]:
            operation = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[int(index)]
            x = operation(x, p[(BRIGHTNESS, CONTRAST, SATURATION, HUE)[int(index)]])
        if p[GRAY]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        out.append(x)
    return torch.stack(out)


def test_the_device_part_applies_torchvisions_operations_with_each_samples_parameters():
    generator = torch.Generator().manual_seed(0)
    x_NCHW = torch.rand(24, 3, 12, 10, generator=generator)
    params_NK = torch.zeros(24, NUM_PARAMS)
    params_NK[:, 0] = 1  # augment
    params_NK[:, FLIP] = torch.arange(24) % 2
    params_NK[:, GRAY] = (torch.arange(24) % 5 == 0).float()
    params_NK[:, BRIGHTNESS : SATURATION + 1] = 0.7 + 0.6 * torch.rand(24, 3, generator=generator)
    params_NK[:, HUE] = -0.3 + 0.6 * torch.rand(24, generator=generator)
    params_NK[:, ORDER] = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.float32)
    got = augment_batch(x_NCHW.clone(), params_NK)  # may change its input
    # kornia's grayscale weights are 0.299/0.587/0.114, torchvision's 0.2989/0.587/0.114.
    torch.testing.assert_close(got, torchvision_reference(x_NCHW, params_NK), atol=1e-3, rtol=0)
    assert not torch.equal(got[1], got[2])  # per-sample parameters, not one draw for the batch


def test_the_device_part_gives_each_sample_the_same_tensor_alone_in_a_batch_or_among_unaugmented_rows():
    """A CPU-only run finishes samples one by one in the workers (no gather, no scatter); evaluation with
    ``eval_augmentation`` mixes augmented and plain rows: the same sample gets the same tensor every way."""
    generator = torch.Generator().manual_seed(2)
    x_NCHW = torch.rand(8, 3, 10, 12, generator=generator)
    params_NK = torch.zeros(8, NUM_PARAMS)
    params_NK[:, 0] = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1.0])  # rows 1 and 4 only normalised
    params_NK[:, FLIP] = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0.0])
    params_NK[:, GRAY] = torch.tensor([0, 0, 1, 0, 0, 1, 0, 0.0])
    params_NK[:, BRIGHTNESS : SATURATION + 1] = 0.7 + 0.6 * torch.rand(8, 3, generator=generator)
    params_NK[:, HUE] = -0.3 + 0.6 * torch.rand(8, generator=generator)
    # Rows 0, 3 and 6 share an order (one group, some flipped); the others each have their own.
    params_NK[:, ORDER] = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0], [0, 1, 2, 3],
                                        [2, 3, 0, 1], [3, 2, 1, 0], [0, 2, 1, 3]], dtype=torch.float32)  # fmt: skip
    reference = torchvision_reference(x_NCHW, params_NK)
    reference[params_NK[:, 0] == 0] = x_NCHW[params_NK[:, 0] == 0]
    torch.testing.assert_close(augment_batch(x_NCHW.clone(), params_NK), reference, atol=1e-3, rtol=0)
    for row in range(8):
        alone = augment_batch(x_NCHW[row : row + 1].clone(), params_NK[row : row + 1])
        torch.testing.assert_close(alone, reference[row : row + 1], atol=1e-3, rtol=0)
    same_order = [0, 3, 6]  # all augmented, in order: changed in place, no copy
    torch.testing.assert_close(
        augment_batch(x_NCHW[same_order].clone(), params_NK[same_order]), reference[same_order], atol=1e-3, rtol=0
    )


def test_the_hue_shift_equals_torchvisions_adjust_hue_on_greys_ties_and_extremes():
    generator = torch.Generator().manual_seed(1)
    x_NCHW = torch.rand(6, 3, 9, 9, generator=generator)
    x_NCHW[0] = 0.5  # grey: no hue
    x_NCHW[1, 0] = x_NCHW[1, 1]  # red and green tie for the maximum
    x_NCHW[2, 1] = x_NCHW[2, 2]
    x_NCHW[3] = x_NCHW[3].round()  # the RGB cube's corners
    factors = torch.tensor([0.3, -0.3, 0.5, -0.5, 0.0, 0.123])
    expected = torch.stack([TF.adjust_hue(x, float(f)) for x, f in zip(x_NCHW, factors)])
    torch.testing.assert_close(shift_hue(x_NCHW, factors), expected, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the device part on the GPU")
def test_the_device_part_on_the_gpu_equals_it_on_the_cpu():
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    torch.manual_seed(0)
    params = torch.stack([draw_augmentation(32, 32)[1] for _ in range(16)])
    augmentation = DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD)
    on_cpu = augmentation(UInt8Images(pixels, params))
    on_gpu = augmentation(UInt8Images(pixels.cuda(), params.cuda()))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)


# -- batches: the seed and the step decide them, not the workers ------------------------------------------


def fast_pacs_module(data_dir, num_workers=0, first_step=0, training_device=None):
    data = load_domains("PACS", data_dir, image_size=24, pipeline="fast")
    module = DomainBedDataModule(data, [3], 0.2, trial_seed=0, seed=0, batch_size=4, steps=3, num_workers=num_workers)
    module.trainer = SimpleNamespace(
        global_step=first_step,
        global_rank=0,
        world_size=1,
        num_devices=1,
        precision_plugin=Precision(),
    )
    if training_device is not None:
        module.trainer.strategy = SimpleNamespace(root_device=torch.device(training_device))
    return module


def training_batches(module) -> list[tuple[torch.Tensor, ...]]:
    return [module.on_after_batch_transfer(batch, 0) for batch in module.train_dataloader()]


def test_training_batches_are_the_same_whatever_the_workers_and_after_a_resume(tmp_path):
    data_dir = write_pacs(tmp_path, images_per_class=3, size=40)
    in_process = training_batches(fast_pacs_module(data_dir))
    with_workers = training_batches(fast_pacs_module(data_dir, num_workers=2))
    resumed = training_batches(fast_pacs_module(data_dir, first_step=2))
    assert len(in_process) == 3 and len(resumed) == 1
    for (x, y, domain), (x_w, y_w, domain_w) in zip(in_process, with_workers):
        assert torch.equal(x, x_w) and torch.equal(y, y_w) and torch.equal(domain, domain_w)
    assert all(torch.equal(a, b) for a, b in zip(resumed[0], in_process[2]))
    x, _, domain = in_process[0]
    assert x.dtype == torch.float32 and x.shape == (12, 3, 24, 24) and domain.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # A CPU-only run finishes each sample in the workers (in parallel, as DomainBed): the same tensors.
    cpu_run = fast_pacs_module(data_dir, num_workers=2, training_device="cpu")
    assert cpu_run.finishes_in_workers
    batches = [next(iter(cpu_run.train_dataloader()))]
    assert not isinstance(batches[0][0], UInt8Images)  # already finished: the batch hook has nothing to do
    torch.testing.assert_close(cpu_run.on_after_batch_transfer(batches[0], 0)[0], in_process[0][0], atol=1e-5, rtol=0)


def test_batchnorm_batches_after_the_last_step_are_the_same_whatever_the_workers_and_after_a_resume(tmp_path):
    """SWAD's and BatchNormUpdate's re-estimation batches (``training_batches``, the steps after the last)
    are the training loader's draw for those steps: with 2 workers, and under another state of the
    process's RNG (a resumed run's), the same tensors, so the same BatchNorm statistics (issue 25)."""
    data_dir = write_pacs(tmp_path, images_per_class=3, size=40)

    def batchnorm_batches(module, rng_seed):
        torch.manual_seed(rng_seed)  # a resumed process: the global RNG elsewhere
        return [module.on_after_batch_transfer(batch, 0) for batch in module.training_batches(3, 2)]

    in_process = batchnorm_batches(fast_pacs_module(data_dir), rng_seed=0)
    resumed = batchnorm_batches(fast_pacs_module(data_dir, first_step=3), rng_seed=1)
    with_workers = batchnorm_batches(fast_pacs_module(data_dir, num_workers=2), rng_seed=2)
    training_draw = fast_pacs_module(data_dir, first_step=3)
    training_draw.steps = 5  # a run that trains on steps 3 and 4 draws them so
    expected = training_batches(training_draw)
    assert len(in_process) == len(expected) == 2
    for batches in (in_process, resumed, with_workers):
        for batch, expected_batch in zip(batches, expected):
            assert all(torch.equal(a, b) for a, b in zip(batch, expected_batch))


def test_each_sample_of_a_training_batch_has_its_own_parameters(tmp_path):
    module = fast_pacs_module(write_pacs(tmp_path, images_per_class=2, size=40))
    images, _, _ = next(iter(module.train_dataloader()))
    assert isinstance(images, UInt8Images) and images.pixels.dtype == torch.uint8
    jitter = images.params[:, BRIGHTNESS : HUE + 1]
    assert len({tuple(row) for row in jitter.tolist()}) == len(jitter)  # no two samples share a draw


def test_the_default_number_of_workers_follows_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(datamodule_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_num_workers() == 15 and default_num_workers(processes_per_node=4) == 3
    monkeypatch.setattr(datamodule_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers() == 0


def test_an_unknown_pipeline_is_refused_with_the_choices(tmp_path):
    with pytest.raises(AppError, match="data.pipeline=pil: choose fast .* or domainbed"):
        load_domains("PACS", write_pacs(tmp_path, images_per_class=1), pipeline="pil")


# -- data.decode=device: JPEGs decoded by the training device (nvjpeg on a GPU; libjpeg-turbo on the CPU here) --


def test_which_files_the_device_decodes(tmp_path):
    """Baseline RGB and greyscale JPEGs go to the device; CMYK, progressive JPEGs and PNGs stay on the workers."""
    decided = {
        kind: decodes_on_device(open_image(write_image_of_kind(tmp_path / kind, kind, 64, 48))) for kind in IMAGE_KINDS
    }
    assert decided == {"rgb": True, "greyscale": True, "cmyk": False, "png": False, "exif_rotated": True}
    progressive = tmp_path / "progressive.jpg"
    pil_loader(write_image_of_kind(tmp_path / "p", "rgb", 64, 48)).save(progressive, progressive=True)
    assert not decodes_on_device(open_image(progressive))


def device_decoded_batch(paths, augment, device="cpu", seed=0):
    """The workers' items (``decode_on_device``), collated, through the device part on ``device``."""
    torch.manual_seed(seed)
    items = [(FastImageTransform(224, augment, decode_on_device=True)(path), torch.tensor(0)) for path in paths]
    images, _ = collate_images(items)
    assert isinstance(images, MixedImages)
    # The batch's own transfer, the one Lightning calls (move_data_to_device: any object with a ``to``).
    return DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD, output_size=224)(move_data_to_device(images, device))


def test_a_batch_decoded_on_the_device_equals_domainbeds_within_2_of_255_whatever_the_files(tmp_path):
    paths = [write_image_of_kind(tmp_path / kind, kind, 640, 480, seed=i) for i, kind in enumerate(IMAGE_KINDS)]
    items = [FastImageTransform(224, False, decode_on_device=True)(path) for path in paths]
    assert [isinstance(item, DeviceJpeg) for item in items] == [True, True, False, False, True]  # a mixed batch
    x = device_decoded_batch(paths, augment=False)
    for path, x_CHW in zip(paths, x):
        difference = pixel_difference(x_CHW, eval_image_transform(224)(pil_loader(path)))
        assert difference.mean() <= 2.0, (path.name, float(difference.mean()))
    # Augmented: the same draws as the workers' decoding, so the same crops, flips and colours.
    augmented = device_decoded_batch(paths, augment=True, seed=3)
    torch.manual_seed(3)
    on_workers = [fast_path(path, 224, augment=True) for path in paths]
    for a, b in zip(augmented, on_workers):
        assert pixel_difference(a, b).mean() <= 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: nvjpeg decoding (data.decode=device)")
def test_nvjpeg_decoding_on_the_gpu_equals_decoding_on_the_cpu(tmp_path):
    paths = [write_image_of_kind(tmp_path / kind, kind, 640, 480, seed=i) for i, kind in enumerate(IMAGE_KINDS)]
    for augment in (False, True):
        on_gpu = device_decoded_batch(paths, augment, device="cuda")
        on_cpu = device_decoded_batch(paths, augment, device="cpu")
        assert pixel_difference(on_gpu.cpu(), on_cpu).mean() <= 1.0


def test_decoding_on_the_device_needs_the_fast_pipeline_and_a_known_decoder(tmp_path):
    data_dir = write_pacs(tmp_path, images_per_class=1)
    with pytest.raises(AppError, match="data.decode=device needs data.pipeline=fast"):
        load_domains("PACS", data_dir, pipeline="domainbed", decode="device")
    with pytest.raises(AppError, match="data.decode=gpu: choose cpu .* or device"):
        load_domains("PACS", data_dir, decode="gpu")
    with pytest.raises(AppError, match=r"data.finish=gpu: choose auto \(.*\), device \(.*\) or workers"):
        load_domains("PACS", data_dir, finish="gpu")
    with pytest.raises(AppError, match="data.finish=device needs data.pipeline=fast"):
        load_domains("PACS", data_dir, pipeline="domainbed", finish="device")
    with pytest.raises(AppError, match="data.finish=workers finishes every image in the loader workers, data.decode="):
        load_domains("PACS", data_dir, decode="device", finish="workers")


# -- the GPU's code path on the CPU (issue 25): data.finish=device, through Lightning's own transfer ------------


def python_scalars(batch) -> list:
    """What Lightning's ``apply_to_collection`` finds in ``batch`` as Python numbers or bytes (a ``bytes``
    object is a sequence of ints to it: each its own call)."""
    found = []
    apply_to_collection(batch, (int, float, bytes), lambda value: found.append(value) or value)
    return found


def test_lightning_moves_the_fast_pipelines_batches_as_objects_without_walking_their_bytes_or_converting_them(
    tmp_path,
):
    """Lightning walks a batch with ``apply_to_collection`` in its transfer and in the half-precision
    plugins' ``convert_input``: JPEG bytes as ``bytes`` were a sequence of Python ints (one call per byte),
    and floating tensors of a tuple were cast to half (crop boxes and draw parameters rounded)."""
    paths = [write_image_of_kind(tmp_path / kind, kind, 600, 520, seed=i) for i, kind in enumerate(("rgb", "png"))]
    torch.manual_seed(0)
    samples = [(FastImageTransform(24, True, decode_on_device=True)(path), torch.tensor(0)) for path in paths]
    for batch in (collate_images(samples), collate_images(samples[1:])):  # MixedImages, then UInt8Images
        images = batch[0]
        assert python_scalars(batch) == []  # nothing for Lightning to walk into, byte by byte
        for converted in (
            HalfPrecision("bf16-true").convert_input(batch),
            HalfPrecision("16-true").convert_input(batch),
        ):
            assert type(converted[0]) is type(images) and torch.equal(converted[0].params, images.params)
            assert converted[0].params.dtype == torch.float32
        moved = move_data_to_device(batch, "cpu")[0]
        assert type(moved) is type(images) and moved.params is images.params
    mixed = collate_images(samples)[0]
    assert mixed.boxes.dtype == torch.long and mixed.jpegs.dtype == torch.uint8
    assert mixed.jpegs.numel() == paths[0].stat().st_size and mixed.paths == [str(paths[0])]


class InputRecorder(pl.LightningModule):
    """A linear head on the channel means; records each training batch's input, and the image batch object
    Lightning hands to its transfer (after ``convert_input``)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 7)
        self.inputs: list[torch.Tensor] = []
        self.transferred: list[object] = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.transferred.append(batch[0])
        return batch

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.inputs.append(x.detach().clone())
        return torch.nn.functional.cross_entropy(self.head(x.mean((2, 3))).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_fast_pacs(data_dir, precision: str, decode: str = "device", finish: str = "device") -> InputRecorder:
    data = load_domains("PACS", data_dir, image_size=32, decode=decode, finish=finish)
    datamodule = DomainBedDataModule(data, [3], 0.2, trial_seed=0, seed=0, batch_size=2, steps=2, num_workers=0)
    module = InputRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert not datamodule.finishes_in_workers  # finish=device: on_after_batch_transfer, on the CPU
    return module


@pytest.mark.filterwarnings("ignore:You have overridden `on_before_batch_transfer`")  # InputRecorder
def test_a_bf16_true_runs_inputs_are_the_32_true_runs_rounded_to_bf16(tmp_path):
    """Through ``Trainer.fit`` with data.decode=device and data.finish=device on the CPU: Lightning converts
    the batch to bf16 before the transfer; the crop boxes (520-pixel images: coordinates that bf16 rounds to
    multiples of 2 and 4) and the jitter factors must reach the device part as drawn."""
    data_dir = write_pacs(tmp_path, images_per_class=1, size=520)
    full, half = fit_fast_pacs(data_dir, "32-true"), fit_fast_pacs(data_dir, "bf16-true")
    assert [type(images) for images in half.transferred] == [MixedImages, MixedImages]  # decoded on the "device"
    assert len(full.inputs) == len(half.inputs) == 2
    for x_full, x_half in zip(full.inputs, half.inputs):
        assert x_full.dtype == torch.float32 and x_half.dtype == torch.bfloat16 and x_full.shape == (6, 3, 32, 32)
        assert torch.equal(x_half, x_full.to(torch.bfloat16))


def test_the_app_decodes_on_the_device_of_a_cpu_run_after_lightnings_transfer(monkeypatch, tmp_path):
    """``python train.py ... data.finish=device data.decode=device trainer.precision=bf16-true`` on the CPU:
    the GPU run's data path, with Lightning's transfer and precision conversion. A truncated JPEG, which
    ``decode_jpeg`` refuses (as nvjpeg does), is decoded as the workers decode it: with their warning, naming it."""
    monkeypatch.setenv(TRUNCATED_IMAGES_ENV, "")  # the app sets it for its run; restored after the test
    data_dir = write_pacs(tmp_path / "data", images_per_class=2, size=40)
    truncated = cut(data_dir / "PACS" / "photo" / "dog" / "0.jpg", keep=0.7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = run_app(
            monkeypatch,
            tmp_path / "run",
            "dataset=pacs",
            "algorithm=erm",
            f"data_dir={data_dir}",
            "backbone=mlp",
            "backbone.width=16",
            "dataset.image_size=32",
            "batch_size=2",
            "steps=1",
            "test_envs=[3]",
            "loader.num_workers=0",
            "data.decode=device",
            "data.finish=device",
            "trainer.precision=bf16-true",
        )
    assert status == 0
    assert [str(w.message) for w in caught if "Truncated" in str(w.message)] == [
        f"Truncated image file(s), loaded as DomainBed loads them (PIL's LOAD_TRUNCATED_IMAGES: the missing part "
        f"is grey): {truncated}."
    ]
    args = records(tmp_path / "run")[-1]["args"]
    assert (args["data_pipeline"], args["data_decode"], args["data_finish"]) == ("fast", "device", "device")


def test_a_cpu_run_decoding_in_the_workers_instead_names_a_broken_file_with_the_download_hint(tmp_path):
    """data.decode=device on a CPU-only run with data.finish=auto falls back to the workers' decode: through
    the dataset's reader, whose error names the dataset folder and the command that downloads it again."""
    data_dir = write_pacs(tmp_path, images_per_class=1, size=40)
    broken = data_dir / "PACS" / "photo" / "dog" / "0.jpg"
    broken.write_bytes(b"\xff\xd8 half-copied")
    data = load_domains("PACS", data_dir, image_size=24, decode="device")
    module = DomainBedDataModule(data, [3], 0.2, trial_seed=0, seed=0, batch_size=2, steps=1)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert module.finishes_in_workers
    with pytest.raises(BrokenImageError) as error:
        module.item_transform(data.train_transform)(str(broken))
    assert f"the dataset in {data_dir / 'PACS'}" in str(error.value)
    assert f"(fishr-download pacs --data-dir {data_dir})" in str(error.value)
    # data.finish chooses against the device: device on the CPU, workers on a GPU.
    data.finish = "device"
    assert not module.finishes_in_workers
    data.finish, module.trainer.strategy.root_device = "workers", torch.device("cuda")
    assert module.finishes_in_workers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: nvjpeg decoding (data.decode=device)")
def test_nvjpeg_leaves_a_truncated_jpeg_to_the_workers_decode_with_its_warning(monkeypatch, tmp_path):
    monkeypatch.delenv(TRUNCATED_IMAGES_ENV, raising=False)
    paths = [write_image_of_kind(tmp_path / str(i), "rgb", 640, 480, seed=i) for i in range(3)]
    cut(paths[1], keep=0.7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_gpu = device_decoded_batch(paths, augment=True, device="cuda")
    assert on_gpu.is_cuda and torch.isfinite(on_gpu).all()
    assert [str(w.message) for w in caught if "Truncated" in str(w.message)][0].endswith(f": {paths[1]}.")
    on_cpu = device_decoded_batch(paths, augment=True, device="cpu")  # libjpeg-turbo, the same fallback
    assert pixel_difference(on_gpu.cpu(), on_cpu).mean() <= 1.0
