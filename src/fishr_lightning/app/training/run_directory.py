"""One run directory, one run (issue 19): the lock that keeps a second process out, what ``ckpt_path``
means, when a finished directory may be skipped, and whether a checkpoint can be resumed.

A sweep on a shared cluster launches runs twice, requeues preempted ones and re-launches whole
sweeps; each of these must either continue the run the directory holds or refuse with a message
that says what to do, never mix two runs' records.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fishr_lightning.app import AppError
from fishr_lightning.app.reporting.records import DONE_FILE, RESULTS_FILE, read_records

LOCK_FILE = ".lock"
LOCK_OWNER_FILE = ".lock.owner"  # who holds the lock, for the refusal message (the lock file itself is truncated)
RESUME_CHECKPOINT = Path("checkpoints") / "last.ckpt"
CKPT_PATH_CHOICES = ("auto", "last", None)  # or a checkpoint file
FINISHED = "finished"  # resume_decision's answer for a finished run of the same settings

# Recorded ``args`` that do not change a run's results: a run re-launched with other values of these
# (another data_dir mount, more processes, another save_model) is the same run.
# skipped_images is known only once the data is read: check_same_images compares it before a resume.
ARGS_THAT_DO_NOT_CHANGE_RESULTS = frozenset(
    {"output_dir", "data_dir", "ckpt_path", "save_model", "world_size", "skipped_images"}
)


def process_rank() -> int:
    """This process's global rank as the launchers set it before Lightning starts (0 when alone).

    Only rank 0 takes the lock: Lightning's DDP re-launches the same command for ranks > 0, into the
    same run directory."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Holds ``run_dir/.lock`` for the block (an OS file lock: released when the process dies, so a
    crashed or killed run never blocks its requeue); a second process gets an ``AppError``."""
    if process_rank() != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = (run_dir / LOCK_OWNER_FILE).read_text().strip() if (run_dir / LOCK_OWNER_FILE).exists() else ""
        raise AppError(
            f"Another process is running in {run_dir}{f' ({owner})' if owner else ''}: one run directory holds "
            "one run at a time. Wait for it to end, or give this run another directory (hydra.run.dir=... for a "
            "single run, hydra.sweep.dir=... for a sweep). A process that died leaves no lock behind."
        ) from None
    try:
        (run_dir / LOCK_OWNER_FILE).write_text(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        yield
    finally:
        (run_dir / LOCK_OWNER_FILE).unlink(missing_ok=True)
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


def check_checkpoint(path: str | Path, state_dict: dict[str, Any]) -> None:
    """``path`` is a Lightning checkpoint whose weights fit ``state_dict`` (the new run's module), or
    one ``AppError`` paragraph naming the file (not the 45-line traceback of ``torch.load``)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated zip, random bytes, an unpickling error: torch raises many kinds
        raise checkpoint_error(path, f"it is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise checkpoint_error(path, "it is not a Lightning checkpoint (no state_dict and global_step)")
    saved = checkpoint["state_dict"]
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
