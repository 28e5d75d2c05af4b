"""One run directory, one run (issue 19): the lock that keeps a second process out, what ``ckpt_path``
means, when a finished directory may be skipped, and whether a checkpoint can be resumed.

A sweep on a shared cluster launches runs twice, requeues preempted ones and re-launches whole
sweeps; each of these must either continue the run the directory holds or refuse with a message
that says what to do, never mix two runs' records.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from fishr_lightning.app import AppError
from fishr_lightning.app.reporting.records import ARGS_THAT_DO_NOT_CHANGE_RESULTS, DONE_FILE, RESULTS_FILE, read_records

try:
    import fcntl
except ImportError:  # Windows: filelock's native lock instead
    fcntl = None

LOCK_FILE = ".lock"
LOCK_OWNER_FILE = ".lock.owner"  # who holds the lock, for the refusal message (the lock file itself is truncated)
RESUME_CHECKPOINT = Path("checkpoints") / "last.ckpt"
CKPT_PATH_CHOICES = ("auto", "last", None)  # or a checkpoint file
FINISHED = "finished"  # resume_decision's answer for a finished run of the same settings

# The cluster environments Lightning's accelerator connector detects, in its order
# (_AcceleratorConnector._choose_and_init_cluster_environment); none detected: LightningEnvironment.
CLUSTER_ENVIRONMENTS = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)


def is_global_zero() -> bool:
    """Whether this process will be the run's global rank 0, from the cluster environment Lightning
    will choose, before Lightning starts (alone: ``True``).

    Only rank 0 takes the lock: Lightning's DDP re-launches the same command for ranks > 0, into the
    same run directory. Where Lightning launches those processes itself (``LightningEnvironment``: no
    cluster launcher, or an interactive ``srun`` whose job name is ``bash`` or ``interactive``), rank 0 is
    the process with ``LOCAL_RANK`` and ``NODE_RANK`` 0, whatever ``SLURM_PROCID`` its shell inherited
    (issue 25: every child took rank 0 from it and all but one exited 2 on the lock)."""
    for environment in CLUSTER_ENVIRONMENTS:
        if environment.detect():
            return environment().global_rank() == 0
    lightning = LightningEnvironment()
    return lightning.node_rank() == 0 and lightning.local_rank() == 0


# flock's errors where the file system does not implement it: ENOSYS (Lustre mounted without flock or
# localflock), ENOLCK (NFS without its lock daemon), EOPNOTSUPP/ENOTSUP, EINVAL (some FUSE file systems).
FLOCK_MISSING_ERRNOS = frozenset(
    {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EINVAL}
)
FLOCK_CONTENTION_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
MOUNTS_FILE = Path("/proc/self/mounts")


def mount_of(path: Path) -> tuple[str, str, str]:
    """``(mount point, file system type, mount options)`` of the mount that holds ``path`` (Linux's
    ``/proc/self/mounts``; ``("?", "unknown", "")`` where that cannot be read)."""
    try:
        lines = MOUNTS_FILE.read_text().splitlines()
    except OSError:
        return "?", "unknown", ""
    resolved = str(path.resolve())
    best, best_length = ("?", "unknown", ""), -1
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        mount_point = fields[1].replace("\\040", " ")  # /proc/mounts escapes spaces
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= best_length:  # the innermost mount; the last one mounted over it
            best, best_length = (mount_point, fields[2], fields[3]), len(mount_point)
    return best


def flock_missing_error(run_dir: Path, error: OSError) -> AppError:
    mount_point, file_system, options = mount_of(run_dir)
    return AppError(
        f"The run directory {run_dir} is on a {file_system} file system (mounted at {mount_point} with options "
        f"{options or '?'}) whose file locks do not work here: flock on {run_dir / LOCK_FILE} failed with "
        f"{errno.errorcode.get(error.errno, error.errno)} ({error.strerror}). The app locks each run directory "
        "so that one process at a time runs in it, and needs flock for that: mount the file system with the "
        "flock option (Lustre: -o flock, cluster-wide; NFS: with its lock service, not nolock), or put the runs "
        "on a file system that has it (hydra.run.dir=... for a run, hydra.sweep.dir=... for a sweep)."
    )


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Holds ``run_dir/.lock`` for the block (an OS file lock, ``flock``: released when the process dies,
    so a crashed or killed run never blocks its requeue); a second process gets an ``AppError``, and so
    does a file system without ``flock`` (issue 25: filelock's traceback). On a Lustre mount with
    ``localflock`` the lock holds on this node only: a warning says so."""
    if not is_global_zero():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # no flock (Windows): filelock's native lock
        with _filelock(run_dir):
            yield
        return
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in FLOCK_CONTENTION_ERRNOS:
                raise another_process_error(run_dir) from None
            if error.errno in FLOCK_MISSING_ERRNOS:
                raise flock_missing_error(run_dir, error) from None
            raise
        _, file_system, options = mount_of(run_dir)
        if "localflock" in options.split(","):
            print(
                f"warning: {run_dir} is on a {file_system} mount with localflock: the run directory's lock keeps "
                "out a second process on this node only (mount with flock for a cluster-wide lock).",
                file=sys.stderr,
                flush=True,
            )
        with _lock_owner(run_dir):
            yield
    finally:
        os.close(descriptor)  # releases the lock


def another_process_error(run_dir: Path) -> AppError:
    owner = (run_dir / LOCK_OWNER_FILE).read_text().strip() if (run_dir / LOCK_OWNER_FILE).exists() else ""
    return AppError(
        f"Another process is running in {run_dir}{f' ({owner})' if owner else ''}: one run directory holds "
        "one run at a time. Wait for it to end, or give this run another directory (hydra.run.dir=... for a "
        "single run, hydra.sweep.dir=... for a sweep). A process that died leaves no lock behind."
    )


@contextmanager
def _lock_owner(run_dir: Path) -> Iterator[None]:
    try:
        (run_dir / LOCK_OWNER_FILE).write_text(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        yield
    finally:
        (run_dir / LOCK_OWNER_FILE).unlink(missing_ok=True)


@contextmanager
def _filelock(run_dir: Path) -> Iterator[None]:
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise another_process_error(run_dir) from None
    try:
        with _lock_owner(run_dir):
            yield
    finally:
        lock.release()


def normalised(value: Any) -> Any:
    """``value`` as it reads back from results.jsonl (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def settings_differences(
    recorded: dict[str, Any], args: dict[str, Any], hparams: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(name, recorded value, new value)`` for every recorded ``args``/``hparams`` entry that the new
    command changes, the options that do not change results excepted. An ``args`` entry the record
    lacks is not compared: records of earlier versions of the app hold fewer of them."""
    differences = []
    for section, new in (("args", args), ("hparams", hparams)):
        old = recorded.get(section, {})
        new = normalised(new)
        for name in sorted(set(old) | set(new)):
            if section == "args" and (name in ARGS_THAT_DO_NOT_CHANGE_RESULTS or name not in old):
                continue
            if old.get(name, "<absent>") != new.get(name, "<absent>"):
                differences.append((f"{section}.{name}", old.get(name, "<absent>"), new.get(name, "<absent>")))
    return differences


def check_same_run(run_dir: Path, args: dict[str, Any], hparams: dict[str, Any], finished: bool) -> None:
    """The run recorded in ``run_dir`` has the new command's settings, or an ``AppError`` listing the differences."""
    records = read_records(run_dir)
    if not records:
        return
    differences = settings_differences(records[-1], args, hparams)
    if not differences:
        return
    listed = "; ".join(f"{name}: recorded {old!r}, now {new!r}" for name, old, new in differences[:6])
    more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
    state = "a finished run" if finished else "an unfinished run"
    raise AppError(
        f"{run_dir} holds {state} with other settings ({listed}{more}), so this command is not that run. "
        "Give this run its own directory (hydra.run.dir=...; a sweep names each run's directory after its "
        f"overrides), or delete {run_dir / RESULTS_FILE} to replace the old run, or pass ckpt_path=null to "
        "start afresh in this directory."
    )


def check_same_images(run_dir: Path, skipped_images: int) -> None:
    """A resumed run reads the images its records were made with: one more or one fewer readable file
    (a repaired or half-copied dataset, ``data.skip_broken_images``) draws other in/out splits, whose
    records would follow the old ones in the same ``results.jsonl``."""
    records = read_records(run_dir)
    recorded = records[-1].get("args", {}).get("skipped_images") if records else None
    if recorded is not None and recorded != skipped_images:
        raise AppError(
            f"{run_dir} holds a run that left {recorded} unreadable image(s) out, and the dataset now gives "
            f"{skipped_images}: its files changed, so the in/out splits would too, and the records would mix "
            "two datasets. Restore the dataset as the run read it, or start afresh (ckpt_path=null, or another "
            "hydra.run.dir)."
        )


def resume_decision(run_dir: Path, ckpt_path: str | None, args: dict[str, Any], hparams: dict[str, Any]) -> str | None:
    """What ``ckpt_path`` means in ``run_dir``: ``FINISHED`` (skip: the directory holds this run,
    finished), a checkpoint to resume, or ``None`` (start at step 0).

    - ``auto`` (the default): resume the directory's ``checkpoints/last.ckpt`` when there is one, so
      that a requeued or re-launched run continues;
    - ``null``/``none``: a fresh start, whatever the directory holds;
    - ``last``: that checkpoint, and an error when there is none;
    - a file: continue from it (also a finished run, e.g. its ``model.ckpt`` with more steps).
    A finished run or a checkpoint is only continued when the recorded settings equal the new ones.
    """
    if ckpt_path is None:
        return None
    if ckpt_path not in ("auto", "last"):
        return ckpt_path
    resume = run_dir / RESUME_CHECKPOINT
    finished = (run_dir / DONE_FILE).exists()
    if finished or resume.is_file():
        check_same_run(run_dir, args, hparams, finished)
    if finished:
        return FINISHED
    if resume.is_file():
        return str(resume)
    if ckpt_path == "last":
        raise AppError(
            f"ckpt_path=last: {run_dir} holds no checkpoint ({RESUME_CHECKPOINT} is written after each record). "
            "The default run directory is new at each launch (it is timestamped): to resume a run, pass its "
            "directory, hydra.run.dir=<that run's directory>; ckpt_path=auto (the default) resumes when there is "
            "a checkpoint and starts afresh otherwise."
        )
    return None


def check_ckpt_path_option(ckpt_path: Any) -> str | None:
    """``ckpt_path`` normalised (``none`` and ``null`` as ``None``), or an ``AppError``."""
    if isinstance(ckpt_path, str) and ckpt_path.lower() in ("none", "null"):
        return None
    if ckpt_path in CKPT_PATH_CHOICES:
        return ckpt_path
    if not isinstance(ckpt_path, str) or not Path(ckpt_path).is_file():
        raise AppError(
            f"ckpt_path={ckpt_path} is not a file. Pass a checkpoint of this run (e.g. "
            f"<run dir>/{RESUME_CHECKPOINT.as_posix()} or <run dir>/model.ckpt), ckpt_path=auto (the default: resume "
            "the run directory's checkpoint when there is one), ckpt_path=last (the same, and an error without "
            "one) or ckpt_path=null (start afresh)."
        )
    return ckpt_path


def checkpoint_error(path: str | Path, problem: str) -> AppError:
    return AppError(
        f"The checkpoint {path} cannot be resumed: {problem}. It may have been cut short when its run was "
        f"killed, or come from another run or version. Delete it to start this run afresh (rm {path}), or "
        "pass ckpt_path=null to start afresh and leave it in place."
    )


def check_checkpoint(path: str | Path, module: Any) -> None:
    """``path`` is a Lightning checkpoint whose weights fit ``module`` (the new run's), or one ``AppError``
    paragraph naming the file (not the 45-line traceback of ``torch.load``). A DomainBed module first makes
    the state it creates lazily (Fish's clone, issue 26: ``prepare_for_domainbed_state``)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated zip, random bytes, an unpickling error: torch raises many kinds
        raise checkpoint_error(path, f"it is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise checkpoint_error(path, "it is not a Lightning checkpoint (no state_dict and global_step)")
    saved = checkpoint["state_dict"]
    if hasattr(module, "prepare_for_domainbed_state"):
        module.prepare_for_domainbed_state(saved)
    state_dict = module.state_dict()
    missing = sorted(set(state_dict) - set(saved))
    unexpected = sorted(set(saved) - set(state_dict))
    mismatched = [
        name
        for name in sorted(set(saved) & set(state_dict))
        if getattr(saved[name], "shape", None) != getattr(state_dict[name], "shape", None)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("other shapes", mismatched))
            if names
        ]
        raise checkpoint_error(path, f"its weights do not fit this run's model ({'; '.join(parts)})")
