"""benchmarks/gpu_suite.sh --smoke: the one GPU script (issue 20), known to run before it meets a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_every_part_on_the_cpu_with_smoke(tmp_path):
    out = tmp_path / "suite"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 part(s) failed" in done.stdout
    tables = {path.stem: path.read_text() for path in out.glob("*.md")}
    assert set(tables) >= {"machine", "overhead_16-mixed", "training_throughput", "data_pipeline", "evaluation"}
    assert "| PACS 227×227 |" in tables["training_throughput"] and "in memory" in tables["training_throughput"]
    assert "| PACS 227×227 |" in tables["data_pipeline"] and "evaluation mean" in tables["data_pipeline"]
    assert "| closed_form |" in tables["overhead_16-mixed"]
    assert "| one, workers kept (the app) |" in tables["evaluation"]
