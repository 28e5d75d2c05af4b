"""Logs fit for files and clusters: with stdout not a terminal, a line every ``progress.every`` steps and
the evaluation table, never a progress bar's frames; the first and last lines name the run directory;
no empty ``run.log``, no Lightning tips, no deprecation warnings (issue 19)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def test_a_log_file_gets_progress_lines_and_tables_not_bar_frames(tmp_path):
    log = tmp_path / "log"
    command = [
        sys.executable,
        "train.py",
        "dataset.samples_per_domain=200",
        "batch_size=8",
        "steps=1001",
        "checkpoint_freq=500",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    with log.open("w") as stdout:  # a file, as `python train.py > log` or a SLURM job
        subprocess.run(command, cwd=REPOSITORY, stdout=stdout, stderr=subprocess.STDOUT, timeout=300, check=True)
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text  # no progress-bar frames
    progress = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(progress) == 11 and progress[0].startswith("step 99/1000  loss ")
    assert "steps/s  ETA " in progress[0] and "penalty " in progress[0]
    table_rows = [line for line in text.splitlines() if line.split()[-2:-1] in (["0"], ["500"], ["1000"])]
    assert len(table_rows) == 3  # DomainBed's table: one row per evaluation (steps 0, 500, 1000)
    assert "weights_only" not in text  # Lightning's note on each resume checkpoint, once a line per record
    assert len(text.encode()) < 8_000, len(text.encode())
    lines = text.strip().splitlines()
    run_dir = tmp_path / "run"
    assert lines[0] == f"fishr-train: run directory {run_dir}"
    assert lines[-1] == f"fishr-train: run directory {run_dir} (finished)"
    assert not (run_dir / "run.log").exists() and not (run_dir / "train.log").exists()
    assert "Tip:" not in text and "deprecated" not in text.lower() and "Warning" not in text, text
