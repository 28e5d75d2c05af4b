"""Milliseconds per training step of ``python train.py`` with ``data.decode=device`` against
``data.decode=cpu``, end to end through the app (issue 25: the device decode had never run through Lightning's
batch transfer, which spent about 1 µs of Python per JPEG byte).

    python benchmarks/app_decode.py [--device cuda] [--sizes pacs terra_incognita] [--steps 30] [--warmup 3]
        [--batch 32] [--images-per-class 4] [--workers N] [--output FILE]
    python benchmarks/app_decode.py --smoke     # CPU, tiny sizes, seconds: checks that it runs

One ``python train.py`` per size and decode (the fast pipeline, ERM, ``backbone=mlp`` of width 16: the step
is the data path) over a generated PACS-shaped tree (4 domains × 7 classes, test domain 3: 3 × ``--batch``
images per step) whose JPEGs have one dataset's typical size, timed from inside by
``training_throughput.AppStepClock``: from the start of update ``--warmup`` to the start of the last one, the
evaluations left out. ``cpu``: the loader workers decode; ``device``: the workers only read the files and the
training process decodes after Lightning's batch transfer (nvJPEG on a GPU). On the CPU, ``device`` takes
``data.finish=device`` where the app has that option (else the app decodes in the workers there, as ``cpu``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from data_pipeline import LABELS, SIZES, machine, write_pacs_layout  # noqa: E402

from fishr_lightning.app.training.run import main as app_main  # noqa: E402

DECODES = ("cpu", "device")


def app_configs() -> tuple[Path, dict]:
    """Where the installed app finds its configs (as ``pkg://fishr_lightning.app.configs``), and train.yaml."""
    train = files("fishr_lightning.app.configs").joinpath("train.yaml")
    return Path(str(train)).parent, OmegaConf.to_container(OmegaConf.create(train.read_text()))


def milliseconds_per_step(args: argparse.Namespace, data_dir: Path, run_dir: Path, decode: str) -> float:
    """One run of the app's ``main`` (what ``python train.py`` runs), in this process: one import of torch
    and the app for all the runs (the smoke run's cost is mostly imports); its ms per step."""
    clock = run_dir.with_suffix(".clock")
    overrides = [
        "dataset=pacs",
        "algorithm=erm",
        f"data_dir={data_dir}",
        "test_envs=[3]",
        f"dataset.image_size={args.image_size}",
        "backbone=mlp",
        "backbone.width=16",
        f"batch_size={args.batch}",
        f"steps={args.warmup + args.steps + 1}",
        "checkpoint_freq=1000000",  # records at step 0 and the last: the same two evaluations in every run
        "data.pipeline=fast",
        f"data.decode={decode}",
        *(["data.finish=device"] if decode == "device" and args.device == "cpu" and args.finish else []),
        *([f"loader.num_workers={args.workers}"] if args.workers is not None else []),
        "eval_augmentation=false",
        "save_model=none",
        "progress.every=0",
        "trainer.enable_progress_bar=false",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.clock._target_=training_throughput.AppStepClock",  # this folder is on sys.path
        f"+callbacks.clock.path={clock}",
        f"+callbacks.clock.warmup={args.warmup}",
    ]
    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, ["train.py", *overrides]
    try:
        app_main()
    except SystemExit as exit_:
        if exit_.code:
            raise RuntimeError(f"python train.py {' '.join(overrides)} failed (exit status {exit_.code})") from None
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    seconds, timed_steps = clock.read_text().split()
    return 1000 * float(seconds) / int(timed_steps)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["pacs", "terra_incognita"])
    parser.add_argument("--steps", type=int, default=30, help="timed updates (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="per training domain (3 training domains)")
    parser.add_argument("--image-size", type=int, default=224, help="the training and evaluation images' side")
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="loader workers; default: the app's")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks that it runs")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.device, args.sizes, args.steps, args.warmup, args.batch = "cpu", ["pacs"], 2, 1, 2
        args.image_size, args.images_per_class = 32, 1
        args.workers = 0 if args.workers is None else args.workers
    configs, train = app_configs()
    args.finish = "finish" in train["data"]  # data.finish=device, where the app has it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            data_dir = write_pacs_layout(Path(tmp) / name, *SIZES[name], images_per_class=args.images_per_class)
            ms = {
                decode: milliseconds_per_step(args, data_dir, Path(tmp) / f"run_{name}_{decode}", decode)
                for decode in DECODES
            }
            images = 3 * args.batch
            rows.append(
                f"| {LABELS[name]} | {ms['cpu']:.1f} | {ms['device']:.1f} | {ms['device'] / ms['cpu']:.2f} | "
                f"{1000 * images / ms['cpu']:.0f} | {1000 * images / ms['device']:.0f} |"
            )
            print(rows[-1], flush=True)
    where = "nvJPEG on the GPU" if args.device == "cuda" else ("the training process" if args.finish else "the workers")
    lines = [
        f"Machine: {machine()}. `python benchmarks/app_decode.py {command}` (the app's configs: {configs})",
        "",
        f"`python train.py` (fast pipeline, backbone=mlp of width 16, {args.device}; 3 × {args.batch} images of "
        f"{args.image_size}² per step; "
        f"{args.steps} updates timed after {args.warmup}): ms per step with the workers' decode (`data.decode=cpu`) "
        f"and the device decode (`data.decode=device`: {where}), and training images/s:",
        "",
        "| JPEGs | ms/step decode=cpu | ms/step decode=device | device × | images/s cpu | images/s device |",
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
