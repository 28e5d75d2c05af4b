"""benchmarks/gpu_suite.sh --smoke: the one GPU script (issue 20), known to run before it meets a GPU, with the
tests that need one (``pytest -m gpu``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_every_part_on_the_cpu_with_smoke(tmp_path):
    out = tmp_path / "suite"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke", "--tests", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 part(s) failed" in done.stdout
    tables = {path.stem: path.read_text() for path in out.glob("*.md")}
    assert set(tables) >= {
        "gpu_tests",
        "machine",
        "overhead_16-mixed",
        "training_throughput",
        "data_pipeline",
        "evaluation",
    }
    assert "| PACS 227×227 |" in tables["training_throughput"] and "in memory" in tables["training_throughput"]
    assert "| PACS 227×227 |" in tables["data_pipeline"] and "evaluation mean" in tables["data_pipeline"]
    assert "| closed_form |" in tables["overhead_16-mixed"]
    assert "| one, workers kept (the app) |" in tables["evaluation"]
    # On the CPU the GPU tests are collected and skip, each with its reason.
    assert "skipped" in tables["gpu_tests"] and "needs a CUDA GPU" in tables["gpu_tests"]


def test_every_test_that_skips_without_cuda_is_marked_gpu_so_that_the_suite_runs_it():
    unmarked = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
            if (
                any("cuda.is_available" in decorator for decorator in decorators)
                and "pytest.mark.gpu" not in decorators
            ):
                unmarked.append(f"{path.name}::{node.name}")
    assert unmarked == []
