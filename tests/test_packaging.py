"""What a non-editable install ships (issue 25): the wheel holds every package under src/ and every config,
and its ``fishr-train``, installed into a fresh environment, runs the main job from a folder outside the
checkout. The editable install that the other tests use imports straight from the checkout and hides both.

The main job writes its log to a file, as a cluster job's does: one run checks the install and the log
(issue 19: progress lines, not a progress bar's frames; the run directory named first and last; no empty
``run.log``, no Lightning tips, no deprecation warnings)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fresh_environment import REPOSITORY, copy_checkout, fresh_environment, module_origin


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout (no build/ folder left in it, no stale files taken from one)
    without build isolation, as CI has no network to build one with: the dev extra brings setuptools."""
    source = copy_checkout(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    built = subprocess.run([*command, "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("fishr_lightning-*.whl")
    return wheel


def test_the_wheel_holds_every_package_under_src_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = REPOSITORY / "src"
    for module in source.rglob("*.py"):  # every package, whatever is added later (the list missed baselines/)
        assert module.relative_to(source).as_posix() in names, module
    assert "fishr_lightning/py.typed" in names
    configs = REPOSITORY / "configs"
    for config in [*configs.rglob("*.yaml"), configs / "__init__.py"]:  # pkg://fishr_lightning.app.configs
        assert f"fishr_lightning/app/configs/{config.relative_to(configs).as_posix()}" in names, config
    assert not any(name.startswith(("configs/", "src/", "tests/", "benchmarks/")) for name in names)


def test_the_installed_fishr_train_runs_the_main_job_from_a_folder_outside_the_checkout(wheel, tmp_path):
    bin_folder = fresh_environment(tmp_path / "venv")
    install = [str(bin_folder / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    package = module_origin(bin_folder / "python", "fishr_lightning")
    assert package.is_relative_to(tmp_path / "venv") and not package.is_relative_to(REPOSITORY), package
    folder = tmp_path / "elsewhere"  # the default run directory, outputs/..., is relative to it
    folder.mkdir()
    # The main job (`python train.py`), shortened: fewer samples and steps, as many progress lines and records.
    options = [
        "dataset.samples_per_domain=200",
        "batch_size=8",
        "steps=201",
        "checkpoint_freq=100",
        "progress.every=20",
    ]
    log = tmp_path / "log"
    with log.open("w") as stdout:  # a file, as `fishr-train > log` or a SLURM job
        command = [str(bin_folder / "fishr-train"), *options]
        done = subprocess.run(command, cwd=folder, stdout=stdout, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    (run_dir,) = (folder / "outputs" / "Synthetic" / "Fishr").iterdir()
    lines = text.strip().splitlines()
    assert lines[0] == f"fishr-train: run directory {run_dir}", text
    assert lines[-1] == f"fishr-train: run directory {run_dir} (finished)", text
    assert (run_dir / "done").exists() and len((run_dir / "results.jsonl").read_text().splitlines()) == 3
    assert "\r" not in text and "it/s" not in text  # no progress-bar frames
    progress = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(progress) == 11 and progress[0].startswith("step 19/200  loss ")
    assert "steps/s  ETA " in progress[0] and "penalty " in progress[0]
    table_rows = [line for line in text.splitlines() if line.split()[-2:-1] in (["0"], ["100"], ["200"])]
    assert len(table_rows) == 3  # DomainBed's table: one row per evaluation (steps 0, 100, 200)
    assert "weights_only" not in text  # Lightning's note on each resume checkpoint, once a line per record
    assert len(text.encode()) < 8_000, len(text.encode())
    assert not (run_dir / "run.log").exists() and not (run_dir / "train.log").exists()
    assert "Tip:" not in text and "deprecated" not in text.lower() and "Warning" not in text, text
