"""``trainer=ddp`` is the same experiment as one process: the processes share each step's batch and
count every evaluation sample once, so two CPU processes (gloo) record what one process records; a
preemption signal to either process stops both at the same step, and the same command resumes them to
the uninterrupted run's records (issue 19)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_app_train import assert_logged_accuracies

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


DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


# What an interactive `srun --pty bash` leaves in the shell (one task, job name bash): Lightning does not
# detect SLURM there and launches the ranks itself; each inherits SLURM_PROCID=0 (issue 25).
INTERACTIVE_SRUN = {
    "SLURM_JOB_NAME": "bash",
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_TASKS_PER_NODE": "1",
}


def launch(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python /path/to/train.py`` from another folder, as a cluster job runs it: Lightning re-launches the
    same command line for rank 1, which must find the script and its configs from there too."""
    command = [sys.executable, str(REPOSITORY / "train.py"), *OPTIONS, f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY / "tests"), **(env or {})}  # data_factories' callbacks
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        command, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def run(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> list[dict]:
    completed = launch(run_dir, *overrides, env=env)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return results(run_dir)


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory) -> Path:
    """The same run in one process and in two DDP processes, uninterrupted: ``one/`` and ``two/``, the
    latter launched from an interactive ``srun`` shell (Lightning's own ranks, not the inherited SLURM_PROCID).
    The one-process run in this process (run_app, as the other app tests): no new interpreter to import
    Lightning for it (about 5 s of the suite)."""
    from test_app_train import run_app

    root = tmp_path_factory.mktemp("ddp")
    options = [option for option in OPTIONS if option != "+trainer.enable_model_summary=false"]  # run_app sets it
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_app(monkeypatch, root / "one", *options, "trainer=cpu") == 0
    run(root / "two", *DDP, env=INTERACTIVE_SRUN)
    return root


def test_two_ddp_processes_record_what_one_process_records(one_and_two_processes):
    tmp_path = one_and_two_processes
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 2, 4, 5]
    assert one[0]["args"]["world_size"] == 1 and two[0]["args"]["world_size"] == 2
    assert two[-1]["penalty"] > 0 and two[-1]["loss"] > two[-1]["nll"]  # the all-reduced Fishr penalty is on
    for single, double in zip(one, two):
        accuracies = sorted(name for name in single if name.endswith("_acc"))
        assert len(accuracies) == 6
        assert {name: double[name] for name in accuracies} == {name: single[name] for name in accuracies}
        for name in ("loss", "nll", "penalty"):
            assert double[name] == pytest.approx(single[name], rel=1e-4, abs=1e-6), name
    averaged = [json.loads((tmp_path / run / "averaged.jsonl").read_text()) for run in ("one", "two")]
    # The loggers get each record's accuracies once, from rank 0, and the averaged model's (issue 30).
    assert_logged_accuracies(tmp_path / "two", two, "acc", 3, train_envs=[1, 2])
    assert_logged_accuracies(tmp_path / "two", averaged[1:], "acc_swad", 3, train_envs=[1, 2])
    assert averaged[0]["swad"] == averaged[1]["swad"]
    assert {name: averaged[1][name] for name in accuracies} == {name: averaged[0][name] for name in accuracies}
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("one", "two")]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_the_processes_cannot_share_and_cpu_ddp_with_training_batchnorm_are_refused(
    monkeypatch, tmp_path, capsys
):
    """Both refused when the trainer is built, before any process starts (so in this process). BatchNorm in
    training mode needs synchronised statistics under DDP (issue 25), which torch computes on GPUs only."""
    from data_factories import write_pacs
    from test_app_train import run_app

    options = [option for option in OPTIONS if option != "+trainer.enable_model_summary=false"]  # run_app sets it
    status = run_app(monkeypatch, tmp_path / "run", *options, *DDP, "batch_size=7")
    err = capsys.readouterr().err
    assert status == 2 and "batch_size=7 is the per-domain batch of the whole step, shared by 2 processes" in err

    data_dir = write_pacs(tmp_path / "data", images_per_class=1)
    resnet = ["backbone=resnet18", "backbone.pretrained=false", "dataset.image_size=32", f"data_dir={data_dir}"]
    pacs = ["dataset=pacs", "test_envs=[3]", "batch_size=4", "steps=2", *resnet]
    status = run_app(monkeypatch, tmp_path / "bn", *pacs, *DDP, "backbone.freeze_batchnorm=false")
    err = capsys.readouterr().err
    assert status == 2 and "error: The backbone's BatchNorm layers (network.bn1, network.layer1.0.bn1, " in err
    assert "2 processes on cpu would each normalise over their own share of the batch" in err
    assert "Synchronised BatchNorm (sync_batchnorm), which makes it one, needs GPUs" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if not line.startswith("INFO:")]) == 1
    assert not (tmp_path / "bn" / "results.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_processes_with_training_batchnorm_record_what_one_gpu_records(tmp_path):
    """Synchronised BatchNorm under trainer=ddp (on by default when a BatchNorm trains, issue 25): CORAL's
    per-domain forwards through a ResNet-18 whose BatchNorm statistics train, 2 GPUs against 1."""
    from data_factories import write_pacs

    data_dir = write_pacs(tmp_path / "data", images_per_class=3, size=32)
    options = [
        "dataset=pacs",
        "test_envs=[3]",
        "algorithm=coral",
        "backbone=resnet18",
        "backbone.pretrained=false",
        "backbone.freeze_batchnorm=false",
        "dataset.image_size=32",
        f"data_dir={data_dir}",
        "batch_size=8",
        "steps=4",
        "checkpoint_freq=2",
        "+trainer.deterministic=true",
        "+trainer.enable_model_summary=false",
    ]
    records = {}
    for name, trainer in (("one", ["trainer=gpu"]), ("two", ["trainer=ddp", "trainer.devices=2"])):
        command = [sys.executable, str(REPOSITORY / "train.py"), *options, *trainer, f"hydra.run.dir={tmp_path / name}"]
        completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
        records[name] = results(tmp_path / name)
    assert [r["step"] for r in records["two"]] == [r["step"] for r in records["one"]] == [0, 2, 3]
    for single, double in zip(records["one"], records["two"]):
        for name in sorted(name for name in single if name.endswith("_acc") or name in ("loss", "nll")):
            assert double[name] == pytest.approx(single[name], rel=1e-3, abs=1e-4), name


def test_a_sigterm_to_one_ddp_process_stops_both_at_one_step_and_the_same_command_resumes(
    tmp_path, one_and_two_processes
):
    """The signal reaches one process only (a harder case than SLURM's, which signals every task): the
    processes agree at the end of each update, so both stop after the same one, rank 0 saves it, and
    neither waits forever in a collective for the other."""
    run_dir = tmp_path / "run"
    signal_once = [
        "+callbacks.signal._target_=data_factories.SignalAfter",
        "+callbacks.signal.updates=3",
        f"+callbacks.signal.once_file={tmp_path / 'signalled'}",  # the first process there sends it, once
    ]
    first = launch(run_dir, *DDP, *signal_once)
    assert first.returncode == 128 + signal.SIGTERM, first.stdout[-2000:] + first.stderr[-4000:]
    assert "SIGTERM received: the run stopped after 3 updates" in first.stderr
    assert "Traceback" not in first.stderr
    assert not (run_dir / "done").exists() and [r["step"] for r in results(run_dir)] == [0, 2]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3

    # The same command (ckpt_path auto), signalled again after its last update, in rank 0 only: rank 0 passes
    # the signal on before it stops, so rank 1 stops too rather than wait for it in the averaged evaluation's
    # collectives (issue 25: it raised first, and rank 1 failed on the lost peer or waited for the timeout).
    after_the_last_update = [
        "+callbacks.late._target_=data_factories.SignalAfterTheLastUpdate",
        f"+callbacks.late.once_file={tmp_path / 'signalled_late'}",
        "+callbacks.late.signal_name=SIGUSR1",
    ]
    command = [*DDP, *signal_once, *after_the_last_update]
    resumed = launch(run_dir, *command)
    assert resumed.returncode == 128 + signal.SIGUSR1, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert resumed.stderr.count("SIGUSR1 received: the run stopped after 6 updates (during the work after") == 2
    assert "Traceback" not in resumed.stderr and not (run_dir / "done").exists()

    finished = launch(run_dir, *command)  # the same command again: no more signals
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-4000:]
    assert (run_dir / "done").exists()
    uninterrupted = one_and_two_processes / "two"
    for got, expected in zip(results(run_dir), results(uninterrupted), strict=True):
        for record in (got, expected):
            record.pop("step_time")
            record["args"].pop("output_dir")
        assert got == expected
    expected_weights = torch.load(uninterrupted / "model.pt", weights_only=True)["state_dict"]
    for name, tensor in torch.load(run_dir / "model.pt", weights_only=True)["state_dict"].items():
        torch.testing.assert_close(tensor, expected_weights[name], msg=name)


def test_rank_zero_is_lightnings_global_rank_zero_whatever_the_inherited_slurm_variables(monkeypatch):
    """Rank 0 (the process that takes the run's lock) as Lightning's chosen cluster environment numbers it
    (issue 25): under an interactive srun, LOCAL_RANK and NODE_RANK; under srun's own tasks, SLURM_PROCID."""
    from fishr_lightning.app.training.run_directory import is_global_zero

    for name in ("RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in INTERACTIVE_SRUN.items():
        monkeypatch.setenv(name, value)
    assert is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # the child Lightning launched on this node
    assert not is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # the first process of the second node
    assert not is_global_zero()
    # A batch job's tasks, each launched by srun (Lightning's SLURMEnvironment): SLURM_PROCID is the rank.
    for name, value in {"SLURM_JOB_NAME": "fishr", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert not is_global_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_global_zero()


def test_loader_workers_take_the_affinity_as_this_tasks_share_when_the_launcher_bound_it(monkeypatch):
    """Under srun's CPU binding the affinity is already one task's share of the node (issue 25: it was
    divided by the processes per node again); processes Lightning launches share one affinity."""
    from fishr_lightning.app.data import datamodule

    monkeypatch.setattr(datamodule.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "16")  # 2 tasks on this node, each bound to 8 of the job's 16 cores
    assert datamodule.default_num_workers(processes_per_node=2) == 7
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "8")  # one task with 8 cores, 2 processes launched by Lightning
    assert datamodule.default_num_workers(processes_per_node=2) == 3
    monkeypatch.delenv("SLURM_CPUS_ON_NODE")  # no SLURM: the node's processes share the affinity
    assert datamodule.default_num_workers(processes_per_node=2) == 3
