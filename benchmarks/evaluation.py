"""How fast the app's DomainBed evaluation reads every split: one loader whose workers live for the
whole run (the app) against a loader per split re-created at every evaluation (DomainBed's
``eval_loaders``), on a generated image tree with PACS's layout.

    python benchmarks/evaluation.py [--images-per-class 20] [--image-size 224] [--workers 0 2]
                                    [--evaluations 3] [--model tiny|resnet18] [--device cpu|cuda]

Each evaluation reads every domain's in and out split through the app's transforms (the training
domains through the augmentation, as DomainBed) and runs the model on them under the app's
``per_split_sums``. Images/s counts every image of every evaluation, worker start-up included:
that start-up is what a per-split loader pays ``2 × domains`` times per evaluation. ``--model tiny``
(a strided convolution) leaves the data pipeline as the cost; ``resnet18`` adds a real forward.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from fishr_lightning.app.data.datamodule import DomainBedDataModule, EvaluationSplits
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.fast_images import collate_images
from fishr_lightning.app.data.specs import dataset_spec
from fishr_lightning.app.training.evaluation import per_split_sums


def write_pacs_tree(root: Path, images_per_class: int, size: int) -> Path:
    spec = dataset_spec("PACS")
    rng = np.random.default_rng(0)
    for domain in spec.domain_folders:
        for label in range(spec.num_classes):
            folder = root / spec.folder / domain / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(images_per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def model_for(name: str, num_classes: int) -> nn.Module:
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=num_classes)
    return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class Evaluator(pl.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.datamodule: DomainBedDataModule | None = None

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # No trainer.fit here: the module hands the batch hook to the datamodule (the fast pipeline's device part).
        return batch if self.datamodule is None else self.datamodule.on_after_batch_transfer(batch, dataloader_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def per_split_loaders(datamodule: DomainBedDataModule, step: int, workers: int):
    """DomainBed's way: a fresh DataLoader per split at every evaluation, batches of ``(x, y, split)``."""
    for split_index, split in enumerate(datamodule.eval_splits()):
        keys = [(step, split_index, index) for index in range(len(split))]
        size = datamodule.eval_batch_size
        batches = [keys[start : start + size] for start in range(0, len(keys), size)]
        yield from DataLoader(
            EvaluationSplits(datamodule.eval_splits()),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate_images,  # the fast pipeline's batches (issue 25's DeviceBatch objects)
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--evaluations", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "resnet18"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pipeline", choices=["fast", "domainbed"], default="fast")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as directory:
        root = write_pacs_tree(Path(directory), options.images_per_class, options.image_size)
        data = load_domains("PACS", root, image_size=224, pipeline=options.pipeline)
        trainer = pl.Trainer(accelerator=options.device, devices=1, logger=False, enable_progress_bar=False)
        module = Evaluator(model_for(options.model, data.spec.num_classes)).to(torch.device(options.device))
        trainer.strategy.connect(module)  # per_split_sums moves batches through the module's batch hooks
        print(f"PACS-shaped tree: 4 domains × 7 classes × {options.images_per_class} JPEGs of {options.image_size}², "
              f"model {options.model}, {options.evaluations} evaluations, device {options.device}, "
              f"data.pipeline={options.pipeline}, "
              f"{torch.get_num_threads()} threads\n")  # fmt: skip
        print("| loader | workers | images/s | s per evaluation |")
        print("| --- | --- | --- | --- |")
        for workers in options.workers:
            for way in ("per split, re-created (DomainBed)", "one, workers kept (the app)"):
                datamodule = DomainBedDataModule(
                    data, [3], 0.2, trial_seed=0, seed=0, batch_size=32, steps=5001,
                    num_workers=workers, persistent_workers=True,
                )  # fmt: skip
                module.datamodule = datamodule
                names = datamodule.eval_names
                images = sum(len(split) for split in datamodule.eval_splits()) * options.evaluations
                started = time.perf_counter()
                for evaluation in range(options.evaluations):
                    step = 300 * evaluation
                    if way.startswith("per split"):
                        loader = per_split_loaders(datamodule, step, workers)
                    else:
                        loader = datamodule.eval_loader(step)
                    per_split_sums(trainer, module, loader, len(names), lambda logits, y_N: logits.argmax(1) == y_N)
                seconds = time.perf_counter() - started
                datamodule.teardown("fit")
                print(f"| {way} | {workers} | {images / seconds:.0f} | {seconds / options.evaluations:.2f} |")


if __name__ == "__main__":
    main()
