"""``trainer=ddp`` is the same experiment as one process: the processes share each step's batch and
count every evaluation sample once, so two CPU processes (gloo) record what one process records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

REPOSITORY = Path(__file__).resolve().parents[1]
OPTIONS = [
    "algorithm=fishr",
    "dataset.samples_per_domain=203",  # splits of 163 and 40: not divisible by 2 processes, nothing padded
    "batch_size=8",
    "steps=6",
    "checkpoint_freq=2",
    "+hparams.penalty_anneal_iters=2",
    "+hparams.lambda=10",
    "+trainer.enable_model_summary=false",
    "averaging=swad",  # the averaged model too is evaluated on every process, each sample once (issue 18)
    "averaging.eval_every=2",
]


def run(run_dir: Path, *overrides: str) -> list[dict]:
    command = [sys.executable, "train.py", *OPTIONS, f"hydra.run.dir={run_dir}", *overrides]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_two_ddp_processes_record_what_one_process_records(tmp_path):
    one = run(tmp_path / "one", "trainer=cpu")
    two = run(tmp_path / "two", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 2, 4, 5]
    assert one[0]["args"]["world_size"] == 1 and two[0]["args"]["world_size"] == 2
    for single, double in zip(one, two):
        accuracies = sorted(name for name in single if name.endswith("_acc"))
        assert len(accuracies) == 6
        assert {name: double[name] for name in accuracies} == {name: single[name] for name in accuracies}
        for name in ("loss", "nll", "penalty"):
            assert double[name] == pytest.approx(single[name], rel=1e-4, abs=1e-6), name
    averaged = [json.loads((tmp_path / run / "averaged.jsonl").read_text()) for run in ("one", "two")]
    assert averaged[0]["swad"] == averaged[1]["swad"]
    assert {name: averaged[1][name] for name in accuracies} == {name: averaged[0][name] for name in accuracies}
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("one", "two")]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path):
    command = [
        sys.executable,
        "train.py",
        *OPTIONS,
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "batch_size=7",
    ]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode != 0
    assert "batch_size=7 is the per-domain batch of the whole step, shared by 2 processes" in completed.stderr
