"""What each of DomainBed's algorithms (``fishr_lightning.domainbed.build_algorithm``) costs over its ERM, at
DomainNet size (issues 26, 27).

DomainNet's head (345 classes), batch (5 training domains × 32 samples) and DomainBed's default hyperparameters
for DomainNet, on a ResNet-18 (BatchNorm training) with a linear map to 2048 features as every algorithm's
featurizer, through ``trainer.fit``. Every penalty, burn-in and warm-up is switched on from the first update
(each ``*_anneal_iters`` / ``*_burnin_iters`` / ``linear_steps`` set to 0), so each step pays the algorithm's
whole cost; DANN, CDANN and ADRMX alternate discriminator and generator updates, and their figure is the median
over both kinds.

    python benchmarks/domainbed_algorithms.py                   # CPU: ResNet-18 at 64²
    python benchmarks/domainbed_algorithms.py --device cuda --image-size 224
    python benchmarks/domainbed_algorithms.py --tiny            # seconds: checks that every algorithm runs

The algorithms run in turn, ``--rounds`` times; each figure is the median over all rounds' steps.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import lightning.pytorch as pl
import torch
from baselines import ResNetFeatures, fit_times

from fishr_lightning.domainbed import ALGORITHM_CLASSES, build_algorithm, default_hparams
from fishr_lightning.domainbed.names import DOMAINBED_ALGORITHMS

SWITCHED_ON_FROM_THE_START = ("anneal_iters", "burnin_iters", "linear_steps")


def hparams_for(name: str) -> dict:
    hparams = default_hparams(name, "DomainNet")
    on = {key: 0 if key.endswith(SWITCHED_ON_FROM_THE_START) else value for key, value in hparams.items()}
    if name == "TRM":  # TRM's warm-up is its `iters` (ERM before it)
        on["iters"] = 0
    return on


def step_times(name: str, args: argparse.Namespace) -> tuple[list[float], int]:
    pl.seed_everything(0, verbose=False)
    features = args.features
    module = build_algorithm(
        name, (3, args.image_size, args.image_size), args.classes, args.domains, hparams_for(name),
        featurizer=lambda shape, hparams: ResNetFeatures(features, channels=shape[0]),
    )  # fmt: skip
    return fit_times(module, [], args), len(module.build_optimizers())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per algorithm and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--algorithms", nargs="*", help="DomainBed's names (default: every one built here)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the benchmark runs")
    args = parser.parse_args(argv)
    args.classes, args.features, args.domains, args.per_domain = 345, 2048, 5, 32
    if args.tiny:
        args.image_size, args.steps, args.warmup, args.features, args.per_domain, args.rounds = 32, 2, 1, 64, 4, 1
    names = args.algorithms or [name for name in DOMAINBED_ALGORITHMS if name in ALGORITHM_CLASSES]
    names = ["ERM", *[name for name in names if name != "ERM"]]
    print(
        f"Device: {args.device} ({platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}, "
        f"lightning {pl.__version__}; {args.classes} classes, {args.features} features, "
        f"{args.domains}×{args.per_domain} samples; ResNet-18 at {args.image_size}²; median of {args.rounds} rounds × "
        f"{args.steps} steps after {args.warmup} warm-up steps each.\n"
    )
    steps: dict[str, list[float]] = {name: [] for name in names}
    optimizers: dict[str, int] = {}
    for _ in range(args.rounds):
        for name in names:
            times, optimizers[name] = step_times(name, args)
            steps[name] += times
    erm = statistics.median(steps["ERM"])
    print("| algorithm | optimizers | step ms | × ERM |")
    print("| --- | --- | --- | --- |")
    for name in names:
        ms = statistics.median(steps[name])
        print(f"| {name} | {optimizers[name]} | {1000 * ms:.0f} | {ms / erm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
