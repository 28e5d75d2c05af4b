"""What weight averaging costs per training step: no averaging vs SWADCallback vs Lightning's
EMAWeightAveraging, on the app's embedded dataset's MLP and on a ResNet-18 at 224², with Fishr.

    python benchmarks/swad_cost.py [--device cpu|cuda] [--steps 30] [--output table.md]

Step time is the median over the timed steps of ``on_train_batch_start`` → ``on_train_batch_end``
(the averaging update included, evaluations excluded), after warm-up steps; the memory column is
what the averaging keeps besides the model (the segment being averaged on the device, and at most
``max(n_converge, n_tolerance)`` kept segment averages plus the final average on the CPU for SWAD).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fishr_lightning import FishrCallback, SWADCallback

DOMAINS = 3


class RandomDomains(Dataset):
    def __init__(self, shape, classes, length):
        self.shape, self.classes, self.length = shape, classes, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return torch.randn(self.shape, generator=g), index % self.classes, index % DOMAINS


class Classifier(pl.LightningModule):
    def __init__(self, featurizer, features, classes):
        super().__init__()
        self.featurizer, self.classifier = featurizer, nn.Linear(features, classes)

    def forward(self, x):
        return self.classifier(self.featurizer(x))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-5)


class StepTimer(Callback):
    def __init__(self, warmup, device):
        self.warmup, self.device, self.times, self._start = warmup, device, [], 0.0

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def setting(name):
    if name == "MLP (embedded dataset size)":
        featurizer = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        return featurizer, 256, 5, (64,), 32
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    return resnet, 512, 7, (3, 224, 224), 8


def measure(name, averaging, device, steps, warmup):
    torch.manual_seed(0)
    featurizer, features, classes, shape, per_domain = setting(name)
    module = Classifier(featurizer, features, classes)
    params = sum(p.numel() for p in module.parameters())
    timer = StepTimer(warmup, device)
    callbacks = [FishrCallback(penalty_weight=1000.0, warmup_steps=0, num_domains=DOMAINS)]
    if averaging == "swad":
        callbacks.append(SWADCallback(monitor="val_loss", bn_update_batches=0))
    elif averaging == "ema":
        callbacks.append(EMAWeightAveraging(decay=0.999))
    callbacks.append(timer)
    train = DataLoader(
        RandomDomains(shape, classes, (steps + warmup) * per_domain * DOMAINS), batch_size=per_domain * DOMAINS
    )
    val = DataLoader(RandomDomains(shape, classes, per_domain * DOMAINS), batch_size=per_domain * DOMAINS)
    trainer = pl.Trainer(
        max_steps=steps + warmup,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, train, val)
    extra_device = params * 4 if averaging in ("swad", "ema") else 0
    return statistics.median(timer.times), params, extra_device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=["MLP (embedded dataset size)", "ResNet-18 224²"])
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    rows = [
        "| setting | averaging | step time (ms, median) | vs none | params | extra memory on the device |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.settings:
        baseline = None
        for averaging in ("none", "swad", "ema"):
            seconds, params, extra = measure(name, averaging, args.device, args.steps, args.warmup)
            baseline = baseline or seconds
            rows.append(
                f"| {name} | {averaging} | {1000 * seconds:.2f} | {seconds / baseline:.3f} | {params / 1e6:.2f} M | {extra / 2**20:.1f} MiB |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\n{args.device}, torch {torch.__version__}, lightning {pl.__version__}, {args.steps} timed steps\n{table}")
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
