"""Parameter counts and training-step times of the app's backbones (issue 12): each ``configs/backbone``
preset's architecture with random weights (``pretrained=False``: nothing is downloaded), the app's
7-class linear head (PACS), Adam, one forward + backward + step on a batch at the model's input size
(224² for every preset). The median over a few repetitions after one warm-up step.

    python benchmarks/backbones.py                         # every preset and the torchvision default, CPU
    python benchmarks/backbones.py --presets vit_small convnext_tiny --batch-size 8 --reps 3
    python benchmarks/backbones.py --device cuda --channels-last --compile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fishr_lightning.app.training.module import DomainClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbone"
PRESETS = ["resnet50", "resnet50_augmix", "convnext_tiny", "vit_small", "dinov2_vitb14", "clip_vitb16"]
LARGE = {"dinov2_vitb14", "clip_vitb16"}  # fewer repetitions on CPU


def build(preset: str, channels_last: bool, compile: bool) -> DomainClassifier:
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{preset}.yaml"), resolve=False)
    node.pop("dropout")
    node["pretrained"] = False
    if "timm" in node["_target_"]:
        node.update(channels_last=channels_last, compile=compile)
    featurizer = instantiate(node, input_shape=(3, 224, 224))
    return DomainClassifier(featurizer, num_classes=7)


def step_times(module: DomainClassifier, batch_size: int, reps: int, device: torch.device) -> list[float]:
    size = getattr(module.featurizer, "input_config", {"input_size": (3, 224, 224)})["input_size"]
    x, y = torch.randn(batch_size, *size, device=device), torch.randint(0, 7, (batch_size,), device=device)
    optimizer = torch.optim.Adam(module.parameters(), lr=5e-5)
    times = []
    for _ in range(reps + 1):  # the first one warms up (and compiles)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.cross_entropy(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS, help="files of configs/backbone")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per preset (1 for the ViT-Bs on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"batch {args.batch_size}, {args.device}{', channels_last' if args.channels_last else ''}"
        f"{', compiled' if args.compile else ''}\n"
    )
    print("| preset | model | input | features | parameters | step (s, median) |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        torch.manual_seed(0)
        module = build(preset, args.channels_last, args.compile).to(device).train()
        reps = 1 if device.type == "cpu" and preset in LARGE else args.reps
        times = step_times(module, args.batch_size, reps, device)
        featurizer = module.featurizer
        name = OmegaConf.load(CONFIGS / f"{preset}.yaml").get("name", f"torchvision {preset}")
        size = getattr(featurizer, "input_config", {"input_size": (3, 224, 224)})["input_size"]
        params = sum(p.numel() for p in module.parameters())
        print(
            f"| {preset} | {name} | {size[1]}² | {featurizer.n_outputs} | "
            f"{params / 1e6:.1f} M | {statistics.median(times):.2f} ({len(times)} reps) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
