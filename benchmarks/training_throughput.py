"""Is training data-bound? The app's training images/s on generated JPEGs through each image pipeline
(``data.pipeline=domainbed`` and ``fast``) against the same step on tensors already in memory (issue 20).

    python benchmarks/training_throughput.py [--device cuda] [--backbone resnet50] [--precision bf16-mixed]
        [--sizes pacs terra_incognita] [--steps 20] [--warmup 5] [--batch 32] [--workers N] [--output FILE]
    python benchmarks/training_throughput.py --smoke     # CPU, tiny sizes, seconds: checks that it runs

Each run is ``Trainer.fit`` of the app's ``DomainClassifier`` (ERM, Adam) on the app's
``DomainBedDataModule`` over a PACS-shaped tree (4 domains × 7 classes, test domain 3: 3 × ``--batch``
images per step) whose JPEGs have the size of one dataset's typical image; ``in memory`` feeds one
pre-made normalised batch from host memory at every step (the transfer included, no decoding): the step's
own speed. Images/s over ``--steps`` steps after ``--warmup``, the clock read after synchronising the GPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import LABELS, SIZES, write_pacs_layout  # noqa: E402

from fishr_lightning.app.data.datamodule import DomainBedDataModule, default_num_workers  # noqa: E402
from fishr_lightning.app.data.domains import load_domains  # noqa: E402
from fishr_lightning.app.data.fast_images import collate_images  # noqa: E402
from fishr_lightning.app.training.backbones import MLP, ResNetFeaturizer  # noqa: E402
from fishr_lightning.app.training.module import DomainClassifier  # noqa: E402


class StepClock(pl.Callback):
    """Seconds from the start of step ``warmup`` to the end of the last step (GPU synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = self.ended = 0.0

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.started = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ended = self._now(pl_module)


class AppStepClock(pl.Callback):
    """For ``python train.py +callbacks.clock._target_=training_throughput.AppStepClock +callbacks.clock.path=F``:
    writes to ``path`` the seconds from the start of step ``warmup`` to the start of the last step, and the
    number of steps between (the evaluations, which run at the end of a step, left out)."""

    def __init__(self, path: str, warmup: int = 3) -> None:
        self.path, self.warmup, self.started = path, warmup, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()
        if trainer.global_step == trainer.max_steps - 1:
            Path(self.path).write_text(f"{time.perf_counter() - self.started} {trainer.global_step - self.warmup}")


class InMemory(Dataset):
    """The same normalised batch at every step, from host memory."""

    def __init__(self, batch: tuple[torch.Tensor, ...], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.batch


def build_module(backbone: str, image_size: int) -> DomainClassifier:
    if backbone == "mlp":
        featurizer = MLP(input_shape=(3, image_size, image_size), width=16, depth=2)
    else:
        featurizer = ResNetFeaturizer(
            input_shape=(3, image_size, image_size), depth=int(backbone[6:]), pretrained=False
        )
    return DomainClassifier(featurizer, num_classes=7, lr=5e-5)


def images_per_second(args: argparse.Namespace, data_dir: Path, pipeline: str) -> float:
    steps = args.warmup + args.steps
    data = load_domains(
        "PACS", data_dir, image_size=args.image_size, pipeline="fast" if pipeline == "in memory" else pipeline
    )
    datamodule = DomainBedDataModule(
        data,
        [3],
        0.2,
        trial_seed=0,
        seed=0,
        batch_size=args.batch,
        steps=steps,
        num_workers=args.workers,
        pin_memory=args.device == "cuda",
        persistent_workers=True,
    )
    if pipeline == "in memory":
        raw = next(iter(DataLoader(datamodule.train_dataset(), batch_size=3 * args.batch, collate_fn=collate_images)))
        x, y, domain = datamodule.on_after_batch_transfer(raw, 0)
        loader = DataLoader(InMemory((x, y, domain), steps), batch_size=None, pin_memory=args.device == "cuda")
        fit_kwargs = {"train_dataloaders": loader}
    else:
        fit_kwargs = {"datamodule": datamodule}
    torch.manual_seed(0)
    module = build_module(args.backbone, args.image_size)
    clock = StepClock(args.warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[clock],
    )
    trainer.fit(module, **fit_kwargs)
    return args.steps * 3 * args.batch / (clock.ended - clock.started)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", choices=["resnet50", "resnet18", "mlp"], default="resnet50")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["pacs", "terra_incognita"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="per training domain (3 training domains)")
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="loader workers; default: the app's")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks that it runs")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.backbone, args.precision, args.sizes = "cpu", "mlp", "32-true", ["pacs"]
        args.image_size, args.steps, args.warmup, args.batch, args.images_per_class = 32, 2, 1, 2, 1
        args.workers = 0 if args.workers is None else args.workers
    workers = default_num_workers() if args.workers is None else args.workers
    args.workers = workers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            data_dir = write_pacs_layout(Path(tmp) / name, *SIZES[name], images_per_class=args.images_per_class)
            rates = {
                pipeline: images_per_second(args, data_dir, pipeline) for pipeline in ("domainbed", "fast", "in memory")
            }
            rows.append(
                f"| {LABELS[name]} | {rates['domainbed']:.0f} | {rates['fast']:.0f} | {rates['in memory']:.0f} | "
                f"{rates['domainbed'] / rates['in memory']:.2f} | {rates['fast'] / rates['in memory']:.2f} |"
            )
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    lines = [
        f"{gpu}, torch {torch.__version__}; {args.backbone} at {args.image_size}², {args.precision}, "
        f"3 × {args.batch} images per step, {workers} loader workers, {args.steps} steps after {args.warmup}.",
        "",
        "Training images/s (× in memory: the share of the step's own speed that the data path keeps):",
        "",
        "| JPEGs | domainbed | fast | in memory | domainbed × | fast × |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return table


if __name__ == "__main__":
    main()
