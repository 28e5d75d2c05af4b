"""Clusters, really run: a 2-job sweep through Hydra's ``submitit_local`` launcher (the same pickling
and launching path as ``submitit_slurm``, without a scheduler), one job preempted by SIGTERM and
requeued (issue 19), then ``fishr-collect`` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fishr_lightning.app.reporting import collect

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[slurm]"')
REPOSITORY = Path(__file__).resolve().parents[1]


def test_a_two_job_sweep_through_submitit_local_with_a_preempted_job_is_requeued_and_collected(tmp_path, capsys):
    sweep_dir = tmp_path / "sweeps" / "submitit"
    command = [
        sys.executable,
        "train.py",
        "-m",
        "+sweep=tiny",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep_dir}",
        "algorithm=fishr",
        "hparams_seed=0",
        "trial_seed=0,1",
        "steps=4",
        "checkpoint_freq=2",
        "backbone.width=32",
        # One of the two jobs (the first to get there) sends itself SIGTERM after 2 updates.
        "+callbacks.preempt._target_=data_factories.SignalAfter",
        "+callbacks.preempt.updates=2",
        f"+callbacks.preempt.once_file={tmp_path / 'preempted_once'}",
    ]
    # The test's callback stays out of the run directories' names, as the preset's other keys.
    preset = OmegaConf.load(REPOSITORY / "configs" / "sweep" / "domainbed.yaml")
    excluded = [*preset.hydra.job.config.override_dirname.exclude_keys]
    excluded += [f"callbacks.preempt.{key}" for key in ("_target_", "updates", "once_file")]
    command.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]")
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY / "tests")}
    completed = subprocess.run(
        command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=500, check=False
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    run_dirs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert [path.name for path in run_dirs] == [
        f"algorithm=fishr,backbone.width=32,checkpoint_freq=2,dataset=synthetic,hparams_seed=0,steps=4,"
        f"test_envs=[0],trial_seed={trial_seed}"
        for trial_seed in (0, 1)
    ]
    for run_dir in run_dirs:
        assert (run_dir / "done").exists()
        steps = [json.loads(line)["step"] for line in (run_dir / "results.jsonl").read_text().splitlines()]
        assert steps == [0, 2, 3]
    assert (sweep_dir / ".submitit").is_dir()  # submitit's own logs and pickles, as on SLURM
    logs = {path: path.read_text() for path in (sweep_dir / ".submitit").rglob("*_log.*")}
    preempted = [path for path, text in logs.items() if "SIGTERM received: the run stopped after 2 updates" in text]
    assert len(preempted) == 1, {str(path): text[-1500:] for path, text in logs.items()}
    job_log = preempted[0].with_suffix(".err").read_text() + preempted[0].with_suffix(".out").read_text()
    assert "Requeued job" in job_log and "Job completed successfully" in job_log  # requeued, then resumed
    assert collect.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "Complete runs: 2 (6 records)." in out and "| Fishr |" in out
