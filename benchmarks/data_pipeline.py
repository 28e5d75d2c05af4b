"""How many images per second per CPU core each image pipeline prepares (issue 20), at each DomainBed
dataset's typical image size, on generated photo-like JPEGs, and over JPEG densities at one size; how close
the fast pipeline's tensors are to DomainBed's; and the training images/s of ``python train.py`` end to end
with a tiny backbone.

    python benchmarks/data_pipeline.py [--sizes pacs domain_net office_home terra_incognita] [--images 8]
        [--repeats 3] [--batch 96] [--device cpu|cuda] [--densities 75:2 85:3 90:6 95:8]
        [--density-size terra_incognita] [--end-to-end pacs terra_incognita] [--e2e-steps 15]
        [--e2e-batch 8] [--e2e-repeats 2] [--output FILE]

- **domainbed**: ``data.pipeline=domainbed``, DomainBed's PIL path (full decode, ``RandomResizedCrop``, flip,
  ``ColorJitter(0.3, 0.3, 0.3, 0.3)``, ``RandomGrayscale``, ``ToTensor``, ``Normalize``): all of it runs in
  the loader workers.
- **fast, CPU side**: what the fast pipeline's workers do on a GPU run (reduced DCT decode, crop, resize to
  uint8).
- **fast, whole path on the CPU**: what they do on a CPU-only run: the CPU side, then the device part (flip,
  jitter, grayscale, float, normalise) on each sample (``FinishedInWorker``).
- **device part on the GPU** (``--device cuda``): images/s of the batched device part, and of nvjpeg
  decoding (``torchvision.io.decode_jpeg(device="cuda")``) + crop and resize on the GPU, the option of
  leaving the CPU only the reading of files.

Per core: each pipeline in its own process with one thread (``torch.set_num_threads(1)``; PIL is
single-threaded), as a loader worker runs it (``PipelineWorkers``); images/s = all the images of
``--repeats`` passes over ``--images`` files over all their time, after a warm-up pass, the pipelines taking
turns in every pass. "Workers for 3,000 images/s" is 3,000 over the CPU side's images/s per core: the
loader workers (cores) a GPU step of ResNet-50 in bf16 needs. Densities (``--densities QUALITY:NOISE``):
the generator's JPEG quality and noise at ``--density-size`` (90:6, about 2 bits per pixel, is the other
tables' files). End to end: one run of ``python train.py`` per pipeline (``--e2e-steps`` updates), timed by
a callback (``training_throughput.AppStepClock``) from the start of update 3 to the start of the last one
(evaluations left out): training images/s = steps × 3 domains × ``--e2e-batch`` / seconds, with the app's
default ``loader.num_workers`` on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import pil_loader

from fishr_lightning.app.data.datamodule import FinishedInWorker, default_num_workers
from fishr_lightning.app.data.fast_images import DeviceAugmentation, FastImageTransform, UInt8Images
from fishr_lightning.app.data.image_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_image_transform,
    train_image_transform,
)

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # (width, height): each dataset's typical image
    "pacs": (227, 227),
    "domain_net": (600, 450),
    "office_home": (1600, 1200),
    "terra_incognita": (2048, 1536),
}
LABELS = {
    "pacs": "PACS 227×227",
    "domain_net": "DomainNet 600×450",
    "office_home": "OfficeHome 1600×1200",
    "terra_incognita": "TerraIncognita 2048×1536",
}
OUTPUT_SIZE = 224
TARGET_IMAGES_PER_S = 3000


def photo_like(width: int, height: int, seed: int, noise: float = 6.0) -> np.ndarray:
    """Smooth colour regions, a sharp rectangle and Gaussian noise of standard deviation ``noise`` (as
    ``tests/data_factories.photo_like``)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 48, 2), max(width // 48, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    smooth[: height // 3, width // 2 :] = 0.5 * smooth[: height // 3, width // 2 :] + 100
    return np.clip(smooth + rng.normal(0, noise, smooth.shape), 0, 255).astype(np.uint8)


def write_jpegs(
    folder: Path, width: int, height: int, count: int, first_seed: int = 0, quality: int = 90, noise: float = 6.0
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}.jpg"
        Image.fromarray(photo_like(width, height, first_seed + index, noise)).save(path, quality=quality)
        paths.append(path)
    return paths


def best_rate(work: Callable[[], int], repeats: int) -> float:
    """Items per second of ``work()`` (which returns how many it did): best of ``repeats`` after a warm-up."""
    work()
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        done = work()
        best = max(best, done / (time.perf_counter() - started))
    return best


def make_pipeline(name: str) -> Callable[[Path], object]:
    """What a loader worker does with one file, per pipeline (``PIPELINES``)."""
    if name == "domainbed":
        transform = train_image_transform(OUTPUT_SIZE)
        return lambda path: transform(pil_loader(path))
    if name == "domainbed eval":
        transform = eval_image_transform(OUTPUT_SIZE)
        return lambda path: transform(pil_loader(path))
    if name == "fast whole path":  # a CPU-only run: the device part on each sample, in the workers
        return FinishedInWorker(FastImageTransform(OUTPUT_SIZE, True), DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD))
    return FastImageTransform(OUTPUT_SIZE, augment=name == "fast")


PIPELINES = ("domainbed", "domainbed eval", "fast", "fast eval", "fast whole path")


def pipeline_worker(name: str, connection: Connection) -> None:
    """A loader worker's loop, in its own process: for each list of paths received, the seconds it took to
    prepare them, until ``None``."""
    torch.set_num_threads(1)
    pipeline = make_pipeline(name)
    while (paths := connection.recv()) is not None:
        started = time.perf_counter()
        for path in paths:
            pipeline(path)
        connection.send(time.perf_counter() - started)


class PipelineWorkers:
    """One process per pipeline, as the loader's workers are: each allocator holds only its own pipeline's
    images. (In one process shared by all the pipelines, DomainBed's best pass at TerraIncognita size came out
    31 images/s against 23-24 sustained: its time per image is 33 or 43 ms depending on whether glibc has
    handed its 9 MB decoded image back to the kernel and takes ~6,000 page faults to get it again, which the
    other pipelines' allocations decide.)"""

    def __init__(self, names: tuple[str, ...] = PIPELINES) -> None:
        # Forked, as the DataLoader forks its workers on Linux (and in a second, not a spawned process's imports).
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        self.connections, self.processes = {}, []
        for name in names:
            ours, theirs = context.Pipe()
            process = context.Process(target=pipeline_worker, args=(name, theirs), daemon=True)
            process.start()
            self.connections[name] = ours
            self.processes.append(process)

    def steady_rates(self, paths: list[Path], passes: int) -> dict[str, float]:
        """Images/s of each pipeline over ``paths``: all the images of ``passes`` passes over all their time,
        after a warm-up pass, the pipelines taking turns in every pass (on a shared machine each sees the same
        load). The total, not the best pass: what a worker sustains."""
        seconds = dict.fromkeys(self.connections, 0.0)
        for repeat in range(passes + 1):
            for name, connection in self.connections.items():
                connection.send([str(path) for path in paths])
                elapsed = connection.recv()
                if repeat:
                    seconds[name] += elapsed
        return {name: passes * len(paths) / total for name, total in seconds.items()}

    def close(self) -> None:
        for connection in self.connections.values():
            connection.send(None)
        for process in self.processes:
            process.join(timeout=30)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_part_rate(batch: UInt8Images, device: torch.device, repeats: int) -> float:
    """Images/s of the device part on ``device`` (the batch already there, as after the transfer)."""
    augmentation = DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD)
    on_device = UInt8Images(batch.pixels.to(device), batch.params.to(device))

    def work() -> int:
        augmentation(on_device)
        synchronize(device)
        return len(on_device.pixels)

    return best_rate(work, repeats)


def nvjpeg_rate(paths: list[Path], batch_size: int, repeats: int) -> float:
    """Images/s of decoding on the GPU (nvjpeg, batched) then cropping and resizing there to 224²."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    data = [read_file(str(path)) for path in paths]
    data = (data * (batch_size // len(data) + 1))[:batch_size]

    def work() -> int:
        images = decode_jpeg(data, device="cuda")
        torch.stack([F.resize(image, [OUTPUT_SIZE, OUTPUT_SIZE], antialias=True) for image in images])
        torch.cuda.synchronize()
        return len(data)

    return best_rate(work, repeats)


def fidelity(paths: list[Path]) -> tuple[float, float, float, float]:
    """Mean and max |fast − DomainBed| in 1/255 of the [0, 1] image: evaluation tensors, then augmented
    tensors drawn with the same seeds (the same parameters)."""
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    augmentation = DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD)

    def fast(path: Path, augment: bool) -> torch.Tensor:
        images = FastImageTransform(OUTPUT_SIZE, augment)(path)
        return augmentation(UInt8Images(images.pixels[None], images.params[None]))[0]

    evaluation, augmented = [], []
    for seed, path in enumerate(paths):
        reference = eval_image_transform(OUTPUT_SIZE)(pil_loader(path))
        evaluation.append(((fast(path, False) - reference) * std).abs() * 255)
        torch.manual_seed(seed)
        reference = train_image_transform(OUTPUT_SIZE)(pil_loader(path))
        torch.manual_seed(seed)
        augmented.append(((fast(path, True) - reference) * std).abs() * 255)
    evaluation, augmented = torch.stack(evaluation), torch.stack(augmented)
    return float(evaluation.mean()), float(evaluation.max()), float(augmented.mean()), float(augmented.max())


def per_core_rows(args: argparse.Namespace, folder: Path, workers: PipelineWorkers) -> tuple[list[str], ...]:
    device = torch.device(args.device)
    speed, fidelity_rows, gpu_rows = [], [], []
    for name in args.sizes:
        width, height = SIZES[name]
        paths = write_jpegs(folder / name, width, height, args.images)
        rates = workers.steady_rates(paths, args.repeats)
        domainbed, domainbed_ev, cpu_side, cpu_side_ev, whole = (rates[name] for name in PIPELINES)
        workers_db, workers_fast = TARGET_IMAGES_PER_S / domainbed, TARGET_IMAGES_PER_S / cpu_side
        speed.append(
            f"| {LABELS[name]} | {domainbed:.0f} | {cpu_side:.0f} | {cpu_side / domainbed:.2f} | {whole:.0f} | "
            f"{whole / domainbed:.2f} | {domainbed_ev:.0f} | {cpu_side_ev:.0f} | {workers_db:.0f} | {workers_fast:.0f} |"
        )
        eval_mean, eval_max, aug_mean, aug_max = fidelity(paths[: min(len(paths), 4)])
        fidelity_rows.append(
            f"| {LABELS[name]} | {bits_per_pixel(paths, width, height):.2f} | {eval_mean:.2f} | {eval_max:.1f} | "
            f"{aug_mean:.2f} | {aug_max:.1f} |"
        )
        if device.type == "cuda":
            fast_train = FastImageTransform(OUTPUT_SIZE, True)
            samples = [fast_train(paths[i % len(paths)]) for i in range(args.batch)]
            batch = UInt8Images(torch.stack([s.pixels for s in samples]), torch.stack([s.params for s in samples]))
            gpu_rows.append(
                f"| {LABELS[name]} | {device_part_rate(batch, device, args.repeats):.0f} | "
                f"{nvjpeg_rate(paths, args.batch, args.repeats):.0f} | {cpu_side * (os.cpu_count() or 1):.0f} |"
            )
        print(speed[-1], flush=True)
    return speed, fidelity_rows, gpu_rows


def bits_per_pixel(paths: list[Path], width: int, height: int) -> float:
    return 8 * sum(path.stat().st_size for path in paths) / (len(paths) * width * height)


def jpeg_density(text: str) -> tuple[int, float]:
    """``--densities`` items: ``QUALITY:NOISE``, a JPEG quality (1-95) and the noise's standard deviation."""
    try:
        quality, noise = text.split(":")
        quality, noise = int(quality), float(noise)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not QUALITY:NOISE, e.g. 90:6 (quality 1-95, noise σ ≥ 0)"
        ) from None
    if not (1 <= quality <= 95 and noise >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the quality goes from 1 to 95 and the noise σ is ≥ 0")
    return quality, noise


def density_rows(args: argparse.Namespace, folder: Path, workers: PipelineWorkers) -> list[str]:
    """DomainBed's and the fast CPU side's images/s at one size over JPEGs of several densities (quality,
    noise): the fast path's floor is the entropy decoding, which grows with the bits per pixel."""
    rows = []
    width, height = SIZES[args.density_size]
    for quality, noise in args.densities:
        folder_name = f"density_{quality}_{noise:g}"
        paths = write_jpegs(folder / folder_name, width, height, args.images, quality=quality, noise=noise)
        rates = workers.steady_rates(paths, args.repeats)
        rows.append(
            f"| {quality} | {noise:g} | {bits_per_pixel(paths, width, height):.2f} | {rates['domainbed']:.0f} | "
            f"{rates['fast']:.0f} | {rates['fast'] / rates['domainbed']:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def write_pacs_layout(root: Path, width: int, height: int, images_per_class: int) -> Path:
    """``root/PACS/<domain>/<class>/*.jpg`` at one image size (the app reads any size)."""
    domains = ("art_painting", "cartoon", "photo", "sketch")
    classes = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    seed = 0
    for domain in domains:
        for label in classes:
            write_jpegs(root / "PACS" / domain / label, width, height, images_per_class, first_seed=seed)
            seed += images_per_class
    return root


def train_rate(data_dir: Path, run_dir: Path, pipeline: str, steps: int, batch: int, device: str) -> float:
    """Training images/s of one ``python train.py`` run, timed from inside (``AppStepClock``)."""
    clock = run_dir.with_suffix(".clock")
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "dataset=pacs",
        "algorithm=erm",
        f"data_dir={data_dir}",
        "backbone=mlp",
        "backbone.width=16",
        f"batch_size={batch}",
        f"steps={steps}",
        "checkpoint_freq=1000000",  # records at step 0 and the last: the same two evaluations in every run
        "test_envs=[3]",
        f"data.pipeline={pipeline}",
        "eval_augmentation=false",
        "save_model=none",
        "progress.every=0",
        "trainer.enable_progress_bar=false",
        f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.clock._target_=training_throughput.AppStepClock",
        f"+callbacks.clock.path={clock}",
    ]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    seconds, timed_steps = clock.read_text().split()
    return int(timed_steps) * 3 * batch / float(seconds)


def end_to_end_rows(args: argparse.Namespace, folder: Path) -> list[str]:
    rows = []
    for name in args.end_to_end:
        data_dir = write_pacs_layout(folder / f"e2e_{name}", *SIZES[name], images_per_class=2)
        rates = dict.fromkeys(("domainbed", "fast"), 0.0)
        for repeat in range(args.e2e_repeats):  # taking turns, the best of each (a shared machine's load moves)
            for pipeline in rates:
                run_dir = folder / f"run_{name}_{pipeline}_{repeat}"
                rate = train_rate(data_dir, run_dir, pipeline, args.e2e_steps, args.e2e_batch, args.device)
                rates[pipeline] = max(rates[pipeline], rate)
        rows.append(
            f"| {LABELS[name]} | {rates['domainbed']:.0f} | {rates['fast']:.0f} | {rates['fast'] / rates['domainbed']:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    import PIL

    return (
        f"{platform.machine()}, {cores} usable cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"Pillow {PIL.__version__}"
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--images", type=int, default=8, help="files per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=96, help="the device part's batch (3 domains × 32)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--densities",
        nargs="*",
        type=jpeg_density,
        default=[(75, 2.0), (85, 3.0), (90, 6.0), (95, 8.0)],
        metavar="QUALITY:NOISE",
        help="JPEG quality and noise σ of the density table's files (none: no table)",
    )
    parser.add_argument("--density-size", choices=list(SIZES), default="terra_incognita")
    parser.add_argument("--end-to-end", nargs="*", choices=list(SIZES), default=["pacs", "terra_incognita"])
    parser.add_argument("--e2e-steps", type=int, default=15, help="updates per end-to-end run (timed: 4 to the last)")
    parser.add_argument("--e2e-batch", type=int, default=8)
    parser.add_argument("--e2e-repeats", type=int, default=2, help="runs per pipeline, taking turns; the best")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workers = PipelineWorkers()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            speed, fidelity_rows, gpu_rows = per_core_rows(args, Path(tmp), workers)
            densities = density_rows(args, Path(tmp), workers)
            e2e = end_to_end_rows(args, Path(tmp)) if args.end_to_end else []
    finally:
        workers.close()
    lines = [
        f"Machine: {machine()}. `python benchmarks/data_pipeline.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "Training images/s per core (each pipeline in its own process, one thread; all images over all time); "
        "evaluation too; loader workers for 3,000 images/s:",
        "",
        "| images | DomainBed | fast, CPU side | × | fast, whole path on the CPU | × | DomainBed eval | fast eval, CPU side "
        "| workers: DomainBed | workers: fast |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *speed,
        "",
        "Pixel difference fast − DomainBed, in 1/255 of the [0, 1] image (evaluation; augmented with the same draws):",
        "",
        "| images | JPEG bits/pixel | evaluation mean | evaluation max | augmented mean | augmented max |",
        "| --- | --- | --- | --- | --- | --- |",
        *fidelity_rows,
    ]
    if densities:
        lines += [
            "",
            f"Over JPEG densities at {LABELS[args.density_size]}, training images/s per core:",
            "",
            "| JPEG quality | noise σ | bits/pixel | DomainBed | fast, CPU side | × |",
            "| --- | --- | --- | --- | --- | --- |",
            *densities,
        ]
    if gpu_rows:
        lines += [
            "",
            f"On the GPU, images/s (batch {args.batch}): the device part; nvjpeg decode + resize on the GPU; the fast "
            "CPU side on every core of this machine:",
            "",
            "| images | device part | nvjpeg decode + resize | CPU side × cores |",
            "| --- | --- | --- | --- |",
            *gpu_rows,
        ]
    if e2e:
        lines += [
            "",
            f"End to end, `python train.py` (backbone=mlp, width 16; 3 × {args.e2e_batch} images per step; "
            f"loader.num_workers default = {default_num_workers()} here), training images/s:",
            "",
            "| images | DomainBed | fast | × |",
            "| --- | --- | --- | --- |",
            *e2e,
        ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return table


if __name__ == "__main__":
    main()
