"""What Fishr costs over ERM: step time and peak memory, through Lightning, per backend.

Each configuration trains the same module (a torchvision backbone, then the `classifier` head)
with ERM, with `FishrCallback(backend="closed_form")` and with `FishrCallback(backend="backpack")`,
always with the penalty switched on (no warm-up), and reports the median step time over many
synchronised steps after warm-up, the peak memory, and the ratios to ERM. A second table times the
penalty alone (head forward, penalty, backward into the features) for the two backends, and for the
full-covariance variant (``covariance="full"``, paper Table 6; its ``N×N`` Gram form, issue 26).

Sizes (issue 6): PACS (7 classes, 2048 features, 3 domains × 32) and DomainNet (345 classes,
2048 features, 5 domains × 32), ResNet-50 at 224² on a GPU; on CPU the default is a smaller
ResNet-18 at 64² with the same head sizes.

    python benchmarks/overhead.py                     # GPU if there is one, else the CPU sizes
    python benchmarks/overhead.py --device cpu --tiny --output /tmp/overhead.md   # seconds
    python benchmarks/overhead.py --device cpu --penalty-only     # the penalty-alone table only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fishr_lightning import FishrCallback, FishrPenalty


@dataclass
class Setting:
    name: str
    num_classes: int
    num_domains: int
    per_domain: int
    backbone: str
    image_size: int
    feature_dim: int = 2048


GPU_SETTINGS = [
    Setting("PACS", 7, 3, 32, "resnet50", 224),
    Setting("DomainNet", 345, 5, 32, "resnet50", 224),
]
CPU_SETTINGS = [
    Setting("PACS", 7, 3, 32, "resnet18", 64),
    Setting("DomainNet", 345, 5, 32, "resnet18", 64),
]
TINY_SETTINGS = [
    Setting("PACS-tiny", 7, 3, 4, "resnet18", 32, feature_dim=64),
    Setting("DomainNet-tiny", 345, 5, 4, "resnet18", 32, feature_dim=64),
]
MODES = ["erm", "closed_form", "backpack"]


class RandomDomainImages(Dataset):
    """Whole batches of random images with every domain present (the data is not what is measured)."""

    def __init__(self, setting: Setting, steps: int) -> None:
        self.setting, self.steps = setting, steps
        batch = setting.num_domains * setting.per_domain
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, setting.image_size, setting.image_size, generator=g)
        self.y = torch.randint(0, setting.num_classes, (batch,), generator=g)
        self.domain = torch.arange(setting.num_domains).repeat_interleave(setting.per_domain)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.x, self.y, self.domain


class Classifier(pl.LightningModule):
    def __init__(self, setting: Setting) -> None:
        super().__init__()
        backbone = getattr(torchvision.models, setting.backbone)(weights=None)
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.featurizer = (
            nn.Sequential(backbone, nn.Linear(width, setting.feature_dim)) if width != setting.feature_dim else backbone
        )
        self.classifier = nn.Linear(setting.feature_dim, setting.num_classes)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-5)


class StepTimer(pl.Callback):
    """Wall time of each training step, with the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_training(setting: Setting, mode: str, device: str, steps: int, warmup: int, precision: str) -> dict:
    """One run (call in a fresh process so that peak memory is this run's alone)."""
    pl.seed_everything(0, verbose=False)
    torch_device = torch.device(device)
    timer = StepTimer(torch_device)
    callbacks = [timer]
    if mode != "erm":
        callbacks.append(
            FishrCallback(
                penalty_weight=1000.0, warmup_steps=0, ema=0.95, backend=mode, num_domains=setting.num_domains
            )
        )
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps + warmup,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = DataLoader(RandomDomainImages(setting, steps + warmup), batch_size=None)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    trainer.fit(Classifier(setting), loader)
    measured = timer.times[warmup:]
    peak = torch.cuda.max_memory_allocated(torch_device) / 2**20 if torch_device.type == "cuda" else peak_rss_mib()
    return {"median_ms": 1000 * statistics.median(measured), "peak_mib": peak, "steps": len(measured)}


def measure_penalty_only(
    setting: Setting, backend: str, device: str, repeats: int, covariance: str = "diagonal"
) -> float:
    """Median ms of head forward + penalty + backward into features and head, synchronised.

    ``covariance="full"`` runs without the EMA, which that variant refuses (issue 26)."""
    from backpack import extend

    torch.manual_seed(0)
    n = setting.num_domains * setting.per_domain
    head = nn.Linear(setting.feature_dim, setting.num_classes).to(device)
    if backend == "backpack":
        extend(head)
    features = torch.randn(n, setting.feature_dim, device=device, requires_grad=True)
    targets = torch.randint(0, setting.num_classes, (n,), device=device)
    domains = torch.arange(setting.num_domains, device=device).repeat_interleave(setting.per_domain)
    ema = {"ema": 0.0} if covariance == "full" else {}
    penalty = FishrPenalty(num_domains=setting.num_domains, backend=backend, covariance=covariance, **ema)
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = head(features)
        value = penalty(features, logits, targets, domains, head=head)
        value.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def data_pipeline_images_per_second(num_workers: int, image_size: int, images: int = 256, repeats: int = 2) -> float:
    """Images/s of the app's training pipeline (JPEG decode + DomainBed's augmentation) on generated
    227×227 JPEGs, PACS's size, read from an image-folder tree as the app reads PACS."""
    import tempfile

    from PIL import Image
    from torchvision.datasets import ImageFolder

    from fishr_lightning.app.data.image_folders import train_image_transform

    with tempfile.TemporaryDirectory() as root:
        g = torch.Generator().manual_seed(0)
        for i in range(images):
            folder = os.path.join(root, f"class{i % 7}")
            os.makedirs(folder, exist_ok=True)
            pixels = torch.randint(0, 256, (227, 227, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        loader = DataLoader(
            ImageFolder(root, train_image_transform(image_size)),
            batch_size=32,
            shuffle=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        for _ in loader:  # warm-up: workers started, files in the page cache
            pass
        start = time.perf_counter()
        for _ in range(repeats):
            for _ in loader:
                pass
        return repeats * images / (time.perf_counter() - start)


def run_in_subprocess(setting: Setting, mode: str, args: argparse.Namespace) -> dict:
    if args.in_process:  # peak memory is then the process's high-water mark so far, not this run's
        return measure_training(setting, mode, args.device, args.steps, args.warmup, args.precision)
    job = json.dumps(
        {
            "setting": asdict(setting),
            "mode": mode,
            "device": args.device,
            "steps": args.steps,
            "warmup": args.warmup,
            "precision": args.precision,
        }
    )
    out = subprocess.run([sys.executable, __file__, "--job", job], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{setting.name}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def penalty_only_lines(args: argparse.Namespace, settings: list[Setting]) -> list[str]:
    """The penalty-alone table: the diagonal (Fishr) per backend, and the full covariance's Gram form."""
    lines = [
        "",
        "Penalty alone (head forward + penalty + backward), median ms:",
        "",
        "| setting | C × D | closed_form | backpack | backpack / closed_form | full covariance | full / closed_form |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting in settings:
        closed = measure_penalty_only(setting, "closed_form", args.device, args.steps)
        full = measure_penalty_only(setting, "closed_form", args.device, args.steps, covariance="full")
        backpack = (
            f"{measure_penalty_only(setting, 'backpack', args.device, args.steps):.2f}"
            if "backpack" in args.modes
            else "-"
        )
        ratio = f"{float(backpack) / closed:.1f}" if backpack != "-" else "-"
        lines.append(
            f"| {setting.name} | {setting.num_classes} × {setting.feature_dim} | {closed:.2f} | {backpack} | {ratio} "
            f"| {full:.2f} | {full / closed:.2f} |"
        )
    return lines


def markdown_report(args: argparse.Namespace, settings: list[Setting]) -> str:
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    header = (
        f"Device: {args.device} ({device_name}); torch {torch.__version__}, lightning {pl.__version__}; "
        f"penalty alone: median of {args.steps} repeats."
    )
    if args.penalty_only:
        return header + "\n" + "\n".join(penalty_only_lines(args, settings)) + "\n"
    lines = [
        f"Device: {args.device} ({device_name}); torch {torch.__version__}, lightning {pl.__version__}; "
        f"precision {args.precision}; median of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| setting | backbone | batch | mode | step ms | × ERM | peak MiB | × ERM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    training_images_per_second = {}
    for setting in settings:
        modes = [mode for mode in MODES if mode in args.modes]
        results = {mode: run_in_subprocess(setting, mode, args) for mode in modes}
        erm = results["erm"]
        batch = setting.num_domains * setting.per_domain
        training_images_per_second[setting.name] = 1000 * batch / results["closed_form"]["median_ms"]
        for mode in modes:
            r = results[mode]
            lines.append(
                f"| {setting.name} | {setting.backbone} {setting.image_size}² | {setting.num_domains}×{setting.per_domain} "
                f"| {mode} | {r['median_ms']:.1f} | {r['median_ms'] / erm['median_ms']:.3f} "
                f"| {r['peak_mib']:.0f} | {r['peak_mib'] / erm['peak_mib']:.3f} |"
            )
    lines += penalty_only_lines(args, settings)
    image_size = settings[0].image_size
    lines += [
        "",
        f"Data pipeline (JPEG decode + DomainBed's training augmentation to {image_size}², batches of 32) "
        "against Fishr (closed form) training throughput, images/s:",
        "",
        "| loader workers | pipeline images/s | "
        + " | ".join(f"{name} training images/s" for name in training_images_per_second)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in training_images_per_second) + " |",
    ]
    for workers in args.workers:
        pipeline = data_pipeline_images_per_second(workers, image_size, images=32 if args.tiny else 256)
        lines.append(
            f"| {workers} | {pipeline:.0f} | "
            + " | ".join(f"{v:.0f}" for v in training_images_per_second.values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 50 on GPU, 10 on CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the benchmark runs")
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per run (peak memory is then not per run)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader workers to measure the data pipeline with (default: 0, 2, and all cores)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=MODES,
        help="the training modes to run (erm and closed_form always: the ratios need them)",
    )
    parser.add_argument(
        "--penalty-only",
        action="store_true",
        help="only the penalty-alone table (diagonal per backend, full covariance): no training, no data pipeline",
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = sorted({"erm", "closed_form", *args.modes}, key=MODES.index)
    if args.job:
        job = json.loads(args.job)
        print(
            json.dumps(
                measure_training(
                    Setting(**job["setting"]), job["mode"], job["device"], job["steps"], job["warmup"], job["precision"]
                )
            )
        )
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    args.steps = args.steps or (50 if args.device == "cuda" else 10)
    args.workers = args.workers or sorted({0, 2, os.cpu_count() or 1})
    settings = TINY_SETTINGS if args.tiny else GPU_SETTINGS if args.device == "cuda" else CPU_SETTINGS
    report = markdown_report(args, settings)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
