"""Runs that survive a cluster (issue 19), on real processes: a run stopped by SIGTERM between two
records saves the step it reached, exits non-zero without ``done``, and the same command resumes it
to the records of an uninterrupted run; a second process launched into a running run's directory
refuses; a killed process's lock does not block; broken checkpoints and ``ckpt_path`` misuse end in
one paragraph."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from data_factories import write_pacs
from test_app_train import FAST, SMALL_SYNTHETIC, records, run_app

from fishr_lightning.app import AppError
from fishr_lightning.app.training.run_directory import run_directory_lock

REPOSITORY = Path(__file__).resolve().parents[1]
OPTIONS = [  # an image tree read by 2 persistent workers per loader (the training and the evaluation loader)
    "dataset=pacs",
    "test_envs=[3]",
    "backbone=mlp",
    "dataset.image_size=16",
    "batch_size=4",
    "loader.eval_batch_size=32",
    "steps=15",
    "checkpoint_freq=5",
    "torch_threads=1",
    "+hparams.penalty_anneal_iters=5",
    "+hparams.lambda=10",
]


def comparable(run_records: list[dict]) -> list[dict]:
    """The records without what differs between two equal runs (timing, the run directory)."""
    kept = []
    for record in run_records:
        record = {key: value for key, value in record.items() if key != "step_time"}
        record["args"] = {key: value for key, value in record["args"].items() if key != "output_dir"}
        kept.append(record)
    return kept


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended early ({process.returncode})"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_sigterm_between_records_saves_exits_non_zero_and_the_same_command_resumes(monkeypatch, tmp_path, capsys):
    """SIGTERM to the whole process group, as SLURM signals every process of a job step: the loader
    workers ignore it (issue 25: they died, and the run ended with "DataLoader worker ... exited
    unexpectedly", status 1, nothing saved), the training process saves and exits 143."""
    run_dir, marker, release = tmp_path / "run", tmp_path / "paused", tmp_path / "release"
    data = [f"data_dir={write_pacs(tmp_path / 'data', images_per_class=3, size=16)}", "loader.num_workers=2"]
    pause = [
        "+callbacks.pause._target_=data_factories.PauseAfter",
        "+callbacks.pause.updates=8",
        f"+callbacks.pause.marker={marker}",
        f"+callbacks.pause.release={release}",
    ]
    command = [sys.executable, "train.py", *FAST, *OPTIONS, *data, *pause, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY / "tests")}
    with (tmp_path / "first.out").open("w") as out, (tmp_path / "first.err").open("w") as err:
        # Its own process group (a job step's): the run and the workers it forks.
        first = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            wait_for(marker, first)  # 8 updates done, records 0 and 5 written, the run holds its directory

            # A second launch of the same command while the first runs: refused, the directory named. In this
            # process (run_app adds FAST): another process than the first, without a new interpreter's imports.
            capsys.readouterr()
            assert run_app(monkeypatch, run_dir, *OPTIONS, *data, *pause) == 2
            second_stderr = capsys.readouterr().err
            assert f"error: Another process is running in {run_dir} (pid {first.pid} on " in second_stderr
            assert "Traceback" not in second_stderr and len(second_stderr.strip().splitlines()) == 1

            os.killpg(first.pid, signal.SIGTERM)  # what SLURM sends every process of the step before it kills a job
            release.touch()
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    stdout, stderr = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert first.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert "SIGTERM received: the run stopped after 8 updates" in stderr and "Traceback" not in stderr
    lines = stdout.strip().splitlines()
    assert lines[0] == f"fishr-train: run directory {run_dir}"
    assert lines[-1] == f"fishr-train: run directory {run_dir} (preempted, not finished)"
    assert not (run_dir / "done").exists() and [r["step"] for r in records(run_dir)] == [0, 5]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 8  # the step reached, not the last record's

    # The same command line again (ckpt_path: auto): it resumes at update 9 and finishes.
    resumed = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert (run_dir / "done").exists() and not (run_dir / "checkpoints").exists()

    uninterrupted = tmp_path / "uninterrupted"
    threads = torch.get_num_threads()
    try:
        assert run_app(monkeypatch, uninterrupted, *OPTIONS, data[0]) == 0  # no workers: the same records
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in records(run_dir)] == [0, 5, 10, 14]
    # Accuracies, losses averaged since the previous record, penalty, epoch, hparams, args: all equal.
    assert comparable(records(run_dir)) == comparable(records(uninterrupted))
    expected = torch.load(uninterrupted / "model.pt", weights_only=True)["state_dict"]
    for name, tensor in torch.load(run_dir / "model.pt", weights_only=True)["state_dict"].items():
        torch.testing.assert_close(tensor, expected[name], msg=name)


def test_sigusr1_in_process_saves_the_step_and_exits_with_128_plus_its_number(monkeypatch, tmp_path, capsys):
    """SIGUSR1 (Lightning's SLURM requeue signal; SIGUSR2 is submitit's) as SIGTERM: the step reached
    saved, no ``done``, status 128 + 10; the handlers are Lightning's originals again afterwards."""
    before = signal.getsignal(signal.SIGUSR1)
    signal_once = [
        "+callbacks.preempt._target_=data_factories.SignalAfter",
        "+callbacks.preempt.updates=3",
        f"+callbacks.preempt.once_file={tmp_path / 'once'}",
        "+callbacks.preempt.signal_name=SIGUSR1",
    ]
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=6", "checkpoint_freq=2", *signal_once) == 138
    assert "SIGUSR1 received: the run stopped after 3 updates" in capsys.readouterr().err
    assert not (run_dir / "done").exists() and [r["step"] for r in records(run_dir)] == [0, 2]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert signal.getsignal(signal.SIGUSR1) == before
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=6", "checkpoint_freq=2", *signal_once) == 0
    assert [r["step"] for r in records(run_dir)] == [0, 2, 4, 5] and (run_dir / "done").exists()


def test_a_signal_after_the_last_update_stops_at_once_and_the_rerun_redoes_the_final_work(
    monkeypatch, tmp_path, capsys
):
    """No resume checkpoint past the last update (resumed from there, Lightning would skip on_train_end:
    no averaged model, a raw model.pt marked done); a signal during the final work stops the run at once,
    and the same command resumes from the last record's checkpoint and does that work."""
    signal_at_end = [
        "+callbacks.preempt._target_=data_factories.SignalAtTrainEnd",
        f"+callbacks.preempt.once_file={tmp_path / 'once'}",
        "+callbacks.preempt.signal_name=SIGUSR1",
    ]
    run_dir = tmp_path / "run"
    options = [*SMALL_SYNTHETIC, "steps=6", "checkpoint_freq=2", "averaging=ema", *signal_at_end]
    assert run_app(monkeypatch, run_dir, *options) == 128 + signal.SIGUSR1
    assert "SIGUSR1 received: the run stopped after 6 updates (during the work after the last update" in (
        capsys.readouterr().err
    )
    assert not (run_dir / "done").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    (run_dir / "averaged.jsonl").unlink()  # written before the signal (callbacks' order): the rerun writes it again
    assert run_app(monkeypatch, run_dir, *options) == 0
    assert [r["step"] for r in records(run_dir)] == [0, 2, 4, 5] and (run_dir / "done").exists()
    assert json.loads((run_dir / "averaged.jsonl").read_text())["step"] == 5


def test_a_signal_after_the_last_update_reaches_the_ranks_lightning_launched_before_this_one_stops():
    """Under DDP, rank 0 passes the signal to the ranks Lightning launched (its launcher's ``kill``); after
    the last update it raised first and never passed it on, leaving them in a collective (issue 25)."""
    from types import SimpleNamespace

    import pytest

    from fishr_lightning.app.training.preemption import Preempted, Preemption

    forwarded = []
    launcher = SimpleNamespace(kill=forwarded.append)
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), global_step=6, global_rank=0)
    for training_over in (False, True):
        forwarded.clear()
        preemption = Preemption(None)
        preemption._trainer, preemption._training_over = trainer, training_over
        if training_over:
            with pytest.raises(Preempted, match="SIGTERM received: the run stopped after 6 updates"):
                preemption._note(signal.SIGTERM, None)
        else:
            preemption._note(signal.SIGTERM, None)  # noted: the run stops at the end of the step
        assert forwarded == [signal.SIGTERM]
        preemption._note(signal.SIGTERM, None)  # a second signal is not passed on again
        assert forwarded == [signal.SIGTERM]

    # A rank behind the others notes the signal while it returns from the last update's vote (which said go
    # on): the others, ahead, stop as after the last update; so does it, rather than wait for them.
    preemption = Preemption(None)

    def vote(decision, all):
        preemption._note(signal.SIGTERM, None)  # arrives as the reduction returns
        return decision

    strategy = SimpleNamespace(launcher=None, reduce_boolean_decision=vote)
    last = SimpleNamespace(strategy=strategy, global_step=6, max_steps=6, world_size=2, global_rank=1)
    preemption._trainer = last
    with pytest.raises(Preempted, match="the run stopped after 6 updates \\(during the work after the last update"):
        preemption.on_train_batch_end(last, None, None, None, 5)


def test_a_sigterm_before_the_first_step_is_not_lost_to_lightnings_exit_0(monkeypatch, tmp_path, capsys):
    """SIGTERM while Lightning builds the training loader (its own handler is in place, Preemption's not
    yet): Lightning would end the fit with status 0; the run saves its first step and exits 143."""
    from fishr_lightning.app.data.datamodule import DomainBedDataModule

    original = DomainBedDataModule.train_dataloader

    def terminated_while_building(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(DomainBedDataModule, "train_dataloader", terminated_while_building)
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=4", "checkpoint_freq=2") == 128 + signal.SIGTERM
    assert "SIGTERM received: the run stopped after 1 update (" in capsys.readouterr().err
    assert not (run_dir / "done").exists() and [r["step"] for r in records(run_dir)] == [0]


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    # The holder is a fork of this process: a process of its own, without a new interpreter importing
    # Lightning for run_directory_lock (about 5 s of the suite).
    holder = os.fork()
    if holder == 0:
        signal.alarm(120)  # a child stuck on a lock inherited from this process's threads ends, the test fails
        try:
            with run_directory_lock(run_dir):
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # not reached unless the lock failed: never back into pytest in the child
    _, status = os.waitpid(holder, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and (run_dir / ".lock").exists()
    with run_directory_lock(run_dir):  # what a requeued run does: the dead process's lock is gone
        pass


def test_a_lock_held_in_this_process_refuses_with_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    with run_directory_lock(run_dir):
        try:
            with run_directory_lock(run_dir):
                raise AssertionError("a second holder got the lock")
        except AppError as error:
            assert f"Another process is running in {run_dir} (pid {os.getpid()} on " in str(error)


def test_a_file_system_without_flock_is_named_with_the_mount_option_and_localflock_warns(monkeypatch, tmp_path, capsys):
    """Lustre mounted without flock answers flock with ENOSYS, NFS without its lock daemon with ENOLCK (issue
    25: filelock's traceback); with localflock the lock holds on one node only."""
    import errno

    import pytest

    from fishr_lightning.app.training import run_directory

    run_dir = tmp_path / "scratch" / "run"
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw,relatime 0 0\n"
        f"10.0.0.1@o2ib:/scratch {tmp_path / 'scratch'} lustre rw,noflock,lazystatfs 0 0\n"
    )
    monkeypatch.setattr(run_directory, "MOUNTS_FILE", mounts)

    def no_flock(code):
        def flock(descriptor, operation):
            raise OSError(code, os.strerror(code))

        return flock

    for code in (errno.ENOSYS, errno.ENOLCK):
        monkeypatch.setattr(run_directory.fcntl, "flock", no_flock(code))
        with pytest.raises(AppError) as refused, run_directory_lock(run_dir):
            raise AssertionError("the block ran without a lock")
        message = str(refused.value)
        assert message.startswith(
            f"The run directory {run_dir} is on a lustre file system (mounted at {tmp_path / 'scratch'} with "
            f"options rw,noflock,lazystatfs) whose file locks do not work here: flock on {run_dir / '.lock'} "
            f"failed with {errno.errorcode[code]} ("
        )
        assert "mount the file system with the flock option (Lustre: -o flock" in message
    monkeypatch.undo()

    mounts.write_text(f"10.0.0.1@o2ib:/scratch {tmp_path / 'scratch'} lustre rw,localflock 0 0\n")
    monkeypatch.setattr(run_directory, "MOUNTS_FILE", mounts)
    with run_directory_lock(run_dir):
        pass
    assert capsys.readouterr().err == (
        f"warning: {run_dir} is on a lustre mount with localflock: the run directory's lock keeps out a second "
        "process on this node only (mount with flock for a cluster-wide lock).\n"
    )


def test_garbage_and_incompatible_checkpoints_are_named_with_what_to_do(monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    garbage = run_dir / "checkpoints" / "last.ckpt"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2") == 2  # ckpt_path: auto finds it
    err = capsys.readouterr().err
    assert f"error: The checkpoint {garbage} cannot be resumed: it is not a readable checkpoint" in err
    assert f"rm {garbage}" in err and "ckpt_path=null" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    # A checkpoint of another model (backbone.width=32): the weights do not fit.
    other = tmp_path / "other"
    assert run_app(monkeypatch, other, *SMALL_SYNTHETIC, "steps=2", "save_model=full", "backbone.width=32") == 0
    capsys.readouterr()
    status = run_app(monkeypatch, tmp_path / "third", *SMALL_SYNTHETIC, "steps=3", f"ckpt_path={other / 'model.ckpt'}")
    err = capsys.readouterr().err
    assert status == 2 and f"The checkpoint {other / 'model.ckpt'} cannot be resumed: its weights do not fit" in err

    # ckpt_path=null starts afresh beside the garbage file.
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "ckpt_path=null") == 0
    assert [r["step"] for r in records(run_dir)] == [0, 1]


def test_ckpt_path_last_without_a_checkpoint_says_how_to_resume(monkeypatch, tmp_path, capsys):
    status = run_app(monkeypatch, tmp_path / "run", *SMALL_SYNTHETIC, "steps=2", "ckpt_path=last")
    err = capsys.readouterr().err
    assert status == 2 and f"ckpt_path=last: {tmp_path / 'run'} holds no checkpoint" in err
    assert "hydra.run.dir=<that run's directory>" in err and not (tmp_path / "run" / "results.jsonl").exists()


def test_a_finished_run_is_skipped_only_for_the_same_settings(monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "algorithm=fishr") == 0
    before = (run_dir / "results.jsonl").read_text()
    capsys.readouterr()
    # Other loader workers, progress lines and save_model do not change the results: skipped.
    same = ["loader.num_workers=0", "progress.every=7", "save_model=none"]
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "algorithm=fishr", *same) == 0
    out = capsys.readouterr().out
    assert f"{run_dir} holds a finished run (done); skipping it" in out
    assert out.strip().splitlines()[-1] == f"fishr-train: run directory {run_dir} (skipped)"
    # Another algorithm: a clear error, the finished run untouched.
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "algorithm=erm") == 2
    err = capsys.readouterr().err
    assert (
        f"error: {run_dir} holds a finished run with other settings (args.algorithm: recorded 'Fishr', now 'ERM'" in err
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "results.jsonl").read_text() == before
    # ckpt_path=null: a fresh start in the same directory, replacing the old records.
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "algorithm=erm", "ckpt_path=null") == 0
    assert {r["args"]["algorithm"] for r in records(run_dir)} == {"ERM"}


def test_unknown_top_level_keys_are_refused_with_the_known_ones(monkeypatch, tmp_path, capsys):
    status = run_app(monkeypatch, tmp_path / "run", "+stpes=100")
    err = capsys.readouterr().err
    assert status == 2 and "error: Unknown option stpes: the app reads none of it" in err
    assert "did you mean steps=100?" in err and "checkpoint_freq, ckpt_path, data, data_dir" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_steps_that_go_back_are_flagged_by_collect(tmp_path, capsys):
    from fishr_lightning.app.reporting import collect

    run_dir = tmp_path / "sweep" / "run"
    run_dir.mkdir(parents=True)
    record = {
        "args": {"dataset": "Synthetic", "algorithm": "ERM", "test_envs": [0], "hparams_seed": 0, "trial_seed": 0}
    }
    record.update({f"env{i}_{s}_acc": 0.5 for i in range(3) for s in ("in", "out")})
    lines = [json.dumps({**record, "step": step}) for step in (0, 150, 300, 150, 300)]  # two writers interleaved
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "done").write_text("done")
    assert collect.main([str(tmp_path / "sweep")]) != 0
    err = capsys.readouterr().err
    assert f"{run_dir / 'results.jsonl'}:4: step 150 follows step 300" in err


def test_under_slurm_lightnings_requeue_signal_requeues_the_job_as_lightning_would(monkeypatch):
    """Preemption takes over SIGUSR1, the signal of Lightning's SLURM auto-requeue (sbatch --signal=USR1@90):
    so it requeues the job itself (scontrol requeue, from rank 0) before exiting with 128 + 10."""
    from types import SimpleNamespace

    import pytest

    from fishr_lightning.app.training import preemption

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "fishr", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(name, value)
    rank0 = SimpleNamespace(strategy=SimpleNamespace(), global_rank=0)  # a single-device strategy: no environment
    assert preemption.slurm_job_to_requeue(rank0, signal.SIGUSR1) == "4242"
    assert preemption.slurm_job_to_requeue(rank0, signal.SIGTERM) is None  # not Lightning's requeue signal
    assert preemption.slurm_job_to_requeue(SimpleNamespace(strategy=SimpleNamespace(), global_rank=1), 10) is None
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert preemption.slurm_job_to_requeue(rank0, signal.SIGUSR1) == "77_3"

    calls = []
    monkeypatch.setattr(
        preemption.subprocess, "run", lambda command, **_: calls.append(command) or SimpleNamespace(returncode=0)
    )
    with pytest.raises(SystemExit) as exit_:
        preemption.Preempted(signal.SIGUSR1, 3, None, slurm_job="77_3").hand_over()
    assert exit_.value.code == 128 + signal.SIGUSR1 and calls == [["scontrol", "requeue", "77_3"]]
    monkeypatch.delenv("SLURM_NTASKS")
    assert preemption.slurm_job_to_requeue(rank0, signal.SIGUSR1) is None  # not a SLURM job


def test_a_resume_over_a_dataset_whose_readable_images_changed_is_refused(tmp_path):
    """One more or one fewer readable image draws other in/out splits: the resumed records would follow
    the old ones in the same results.jsonl, so the resume is refused (checked once the data is read)."""
    import pytest

    from fishr_lightning.app.training.run_directory import check_same_images

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = {"dataset": "PACS", "algorithm": "ERM", "test_envs": [3], "hparams_seed": 0, "trial_seed": 0}
    accuracies = {f"env{env}_{split}_acc": 0.5 for env in range(4) for split in ("in", "out")}
    record = {"step": 0, **accuracies, "args": {**args, "skipped_images": 1}}
    (run_dir / "results.jsonl").write_text(json.dumps(record) + "\n")
    check_same_images(run_dir, 1)
    with pytest.raises(AppError, match=r"left 1 unreadable image\(s\) out, and the dataset now gives 0"):
        check_same_images(run_dir, 0)
