"""benchmarks/gpu_suite.sh --smoke: the one GPU script (issue 20), known to run before it meets a GPU, with the
tests that need one (``pytest -m gpu``), as its header's command runs it on a fresh machine (issue 25)."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from fresh_environment import copy_checkout, fresh_environment

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
DEVICE_TOOL_TIMEOUT = 600  # the device tool's longest command (timeout_s), the suite and its tar together


def header_command() -> str:
    """The one command the script's header gives for the device tool's `run`."""
    (command,) = [
        line.removeprefix("#   ") for line in SUITE.read_text().splitlines() if line.startswith("#   timeout ")
    ]
    return command


def test_the_headers_command_runs_every_part_with_smoke_from_a_copy_where_the_project_is_not_installed(tmp_path):
    """As the device tool runs it (issue 25): from the repository's root, on a fresh machine whose Python has
    no install of the project, with $OUT to bring files back; here with --smoke (no CUDA) and a fresh
    environment's python3 first on PATH."""
    copy = copy_checkout(tmp_path / "repository")
    bin_folder = fresh_environment(tmp_path / "venv")
    command = header_command().replace("gpu_suite.sh ", "gpu_suite.sh --smoke ", 1)
    out = tmp_path / "OUT"
    out.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "PYTHONPATH")}
    environment |= {"PATH": f"{bin_folder}{os.pathsep}{environment['PATH']}", "OUT": str(out)}
    done = subprocess.run(["bash", "-c", command], cwd=copy, capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(0 part(s) failed)" in done.stdout, done.stdout
    with tarfile.open(out / "gpu_suite.tgz") as archive:  # what the tool brings back
        tables = {
            Path(member.name).stem: archive.extractfile(member).read().decode()
            for member in archive.getmembers()
            if member.name.endswith(".md")
        }
    assert set(tables) >= {
        "gpu_tests",
        "machine",
        "overhead_16-mixed",
        "training_throughput",
        "data_pipeline",
        "app_decode",
        "evaluation",
        "summary",
    }
    # The suite installed the copy it runs in: the app finds its configs there.
    assert f" from {copy / 'src' / 'fishr_lightning'}\n" in tables["machine"]
    assert f"(the app's configs: {copy / 'configs'})" in tables["app_decode"]
    assert "| PACS 227×227 |" in tables["training_throughput"] and "in memory" in tables["training_throughput"]
    assert "| PACS 227×227 |" in tables["data_pipeline"] and "evaluation mean" in tables["data_pipeline"]
    assert "| PACS 227×227 |" in tables["app_decode"] and "ms/step decode=device" in tables["app_decode"]
    assert "| closed_form |" in tables["overhead_16-mixed"]
    assert "| one, workers kept (the app) |" in tables["evaluation"]
    # On the CPU the GPU tests are collected and skip, each with its reason.
    assert "skipped" in tables["gpu_tests"] and "needs a CUDA GPU" in tables["gpu_tests"]


def test_on_a_gpu_the_limits_add_up_to_less_than_the_headers_timeout_with_a_margin():
    """Issue 25: 630 s of limits under `timeout 540`. Every step on a GPU (the wheels, the install, each part)
    with its grace period before SIGKILL, 30 s under the header's timeout, which leaves the tool its tar."""
    script = SUITE.read_text()
    outer = int(header_command().split()[1])
    on_a_gpu = script[script.index("# The install (issue 25)") : script.index("if [ $smoke -eq 1 ]")]
    on_a_gpu += script[script.index("\nelse\n") : script.index("\nfi\n\nsummary")]
    limits = [int(limit) for limit in re.findall(r"^\s*part \S+ (\d+) ", on_a_gpu, flags=re.MULTILINE)]
    grace = int(re.search(r"^grace=(\d+)", script, flags=re.MULTILINE).group(1))
    assert len(limits) >= 13  # wheels, install, machine, gpu_tests and the nine benchmarks
    assert sum(limits) + grace * len(limits) <= outer - 30 and outer + 20 <= DEVICE_TOOL_TIMEOUT


def test_a_suite_told_to_stop_stops_every_running_part_with_its_processes_and_names_them(tmp_path):
    """The outer timeout's SIGTERM reaches the suite, not its parts (each has a process group of its own):
    the suite passes it on to each part's whole group and names the parts it stopped."""
    started = tmp_path / "started"
    python = tmp_path / "python"  # pip and compileall succeed; every part starts a child that would outlive its parent
    python.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in "-c import os; print(len(os.sched_getaffinity(0)))") echo 2 ;; "-m pip"* | "-m compileall"*) exit 0 ;;\n'
        f"*) sleep 300 & echo $! >> {started}; wait ;; esac\n"
    )
    python.chmod(0o755)
    out = tmp_path / "suite"
    suite = subprocess.Popen(
        ["bash", str(SUITE), "--smoke", "--tests", str(out)],
        env={**os.environ, "PYTHON": str(python)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    parts = [
        "machine",
        "gpu_tests",
        "overhead_16-mixed",
        "training_throughput",
        "data_pipeline",
        "app_decode",
        "evaluation",
    ]
    deadline = time.monotonic() + 60
    while not started.exists() or len(started.read_text().split()) < len(parts):
        assert suite.poll() is None and time.monotonic() < deadline, "the parts did not start"
        time.sleep(0.1)
    suite.send_signal(signal.SIGTERM)
    output = suite.communicate(timeout=60)[0]
    assert suite.returncode == 143, output
    for pid in map(int, started.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    summary = output.strip().splitlines()[-1]
    assert summary.startswith(f"Tables in {out}/ ({len(parts)} part(s) failed: "), output
    for name in parts:
        assert (
            f"{name} (stopped with the suite after " in summary
            and f"   {name} FAILED (stopped with the suite" in output
        )
        assert "did not finish** (stopped with the suite after " in (out / f"{name}.md").read_text()


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
