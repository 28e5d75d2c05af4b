"""What each algorithm of Fishr's comparison set costs over ERM, at DomainNet size.

DomainNet's head (345 classes, 2048 features) and batch (5 training domains × 32 samples), on the
app's module (``fishr_lightning.app.training.module.DomainClassifier``) over a ResNet-18 with a
linear map to 2048 features, through Lightning, every penalty on from step 0. CORAL, MMD, GroupDRO
and Mixup run as the app runs them: the ResNet's BatchNorm trains, so the featurizer runs once per
domain (per pair for Mixup), as DomainBed does. A second table times each penalty alone (the head's
forward, the penalty and the backward into the features), which is what the callbacks add.

    python benchmarks/baselines.py                                  # CPU: ResNet-18 at 64²
    python benchmarks/baselines.py --device cuda --image-size 224   # a GPU
    python benchmarks/baselines.py --tiny                           # seconds: checks that it runs

The algorithms run in turn, ``--rounds`` times, and each figure is the median over all rounds' steps:
on a shared machine a burst of load then spreads over every algorithm instead of landing on one.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fishr_lightning import FishrCallback
from fishr_lightning.app.training.module import DomainClassifier
from fishr_lightning.baselines import (
    CORALCallback,
    GroupDROCallback,
    IRMCallback,
    MMDCallback,
    SDCallback,
    VRExCallback,
)
from fishr_lightning.baselines import functional as BF

ALGORITHMS = ["ERM", "Fishr", "IRM", "VREx", "CORAL", "MMD", "GroupDRO", "Mixup", "SD"]
PER_DOMAIN_FORWARD = {"CORAL", "MMD", "GroupDRO", "Mixup"}


def callbacks_for(algorithm: str, num_domains: int) -> list[pl.Callback]:
    """DomainBed's default hyperparameters, annealing at step 0 so that every step pays the penalty."""
    return {
        "ERM": [],
        "Mixup": [],
        "Fishr": [FishrCallback(penalty_weight=1000.0, warmup_steps=0, ema=0.95, num_domains=num_domains)],
        "IRM": [IRMCallback(100.0, 0, num_domains=num_domains)],
        "VREx": [VRExCallback(10.0, 0, num_domains=num_domains)],
        "CORAL": [CORALCallback(1.0, num_domains=num_domains)],
        "MMD": [MMDCallback(1.0, num_domains=num_domains)],
        "GroupDRO": [GroupDROCallback(0.01, num_domains=num_domains)],
        "SD": [SDCallback(0.1)],
    }[algorithm]


class ResNetFeatures(nn.Module):
    """ResNet-18 (BatchNorm training) then a linear map to ``features`` outputs: DomainNet's head input."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.network = torchvision.models.resnet18(weights=None)
        self.network.fc = nn.Linear(self.network.fc.in_features, features)
        self.n_outputs = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class RandomDomainImages(Dataset):
    """The same whole batch at every step, one contiguous block per domain (the data is not what is measured)."""

    def __init__(self, classes: int, domains: int, per_domain: int, image_size: int, steps: int) -> None:
        g = torch.Generator().manual_seed(0)
        n = domains * per_domain
        self.x = torch.randn(n, 3, image_size, image_size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.domain = torch.arange(domains).repeat_interleave(per_domain)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.x, self.y, self.domain


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def step_times(algorithm: str, args: argparse.Namespace) -> list[float]:
    """One fit; the seconds of each step after warm-up."""
    pl.seed_everything(0, verbose=False)
    module = DomainClassifier(
        ResNetFeatures(args.features),
        num_classes=args.classes,
        lr=5e-5,
        per_domain_forward=algorithm in PER_DOMAIN_FORWARD,
        mixup_alpha=0.2 if algorithm == "Mixup" else None,
    )
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *callbacks_for(algorithm, args.domains)],
    )
    data = RandomDomainImages(args.classes, args.domains, args.per_domain, args.image_size, args.warmup + args.steps)
    trainer.fit(module, DataLoader(data, batch_size=None))
    return timer.times[args.warmup :]


def penalty_times(algorithm: str, args: argparse.Namespace, repeats: int = 5) -> list[float]:
    """The head's forward, the penalty and the backward into features and head: seconds of each repeat."""
    torch.manual_seed(0)
    n = args.domains * args.per_domain
    head = nn.Linear(args.features, args.classes).to(args.device)
    features = torch.randn(n, args.features, device=args.device, requires_grad=True)
    targets = torch.randint(0, args.classes, (n,), device=args.device)
    domains = torch.arange(args.domains, device=args.device).repeat_interleave(args.per_domain)
    E = args.domains
    q = torch.ones(E, device=args.device)

    def penalty(logits: torch.Tensor) -> torch.Tensor:
        if algorithm == "IRM":
            return BF.irm_penalty(logits, targets, domains, E)
        losses = BF.domain_mean_losses(F.cross_entropy(logits, targets, reduction="none"), domains, E)
        if algorithm == "VREx":
            return BF.vrex_penalty(losses)
        if algorithm == "GroupDRO":
            return BF.groupdro_objective(BF.groupdro_update(q, losses, 0.01), losses)
        if algorithm == "CORAL":
            return BF.coral_penalty(features, domains, E)
        if algorithm == "MMD":
            return BF.mmd_penalty(features, domains, E)
        return BF.spectral_decoupling_penalty(logits)

    times = []
    for i in range(repeats + 3):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = head(features)
        (F.cross_entropy(logits, targets) + penalty(logits)).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per algorithm and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the benchmark runs")
    args = parser.parse_args(argv)
    args.classes, args.features, args.domains, args.per_domain = 345, 2048, 5, 32
    if args.tiny:
        args.image_size, args.steps, args.warmup, args.features, args.per_domain, args.rounds = 32, 2, 1, 64, 4, 1

    print(
        f"Device: {args.device} ({platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}, "
        f"lightning {pl.__version__}; {args.classes} classes, {args.features} features, "
        f"{args.domains}×{args.per_domain} samples; ResNet-18 at {args.image_size}²; median of {args.rounds} rounds × "
        f"{args.steps} steps after {args.warmup} warm-up steps each.\n"
    )
    steps = {algorithm: [] for algorithm in ALGORITHMS}
    alone = {algorithm: [] for algorithm in ALGORITHMS if algorithm not in ("ERM", "Mixup", "Fishr")}
    for _ in range(args.rounds):
        for algorithm in ALGORITHMS:
            steps[algorithm] += step_times(algorithm, args)
            if algorithm in alone:
                alone[algorithm] += penalty_times(algorithm, args)
    print("| algorithm | forwards of the featurizer | step ms | × ERM | penalty alone ms |")
    print("| --- | --- | --- | --- | --- |")
    erm = statistics.median(steps["ERM"])
    for algorithm in ALGORITHMS:
        ms = statistics.median(steps[algorithm])
        penalty = f"{1000 * statistics.median(alone[algorithm]):.1f}" if algorithm in alone else "-"
        forwards = "one per domain" if algorithm in PER_DOMAIN_FORWARD else "one"
        print(f"| {algorithm} | {forwards} | {1000 * ms:.0f} | {ms / erm:.2f} | {penalty} |", flush=True)


if __name__ == "__main__":
    main()
