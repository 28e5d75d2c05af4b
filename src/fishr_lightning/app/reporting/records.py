"""A run directory's files in DomainBed's format, read without torch: ``results.jsonl`` (one JSON
record per evaluation) and the ``done`` marker. The training app writes them (``results.py``);
``fishr-collect`` reads them (``collect.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fishr_lightning.app.reporting.model_selection import Record, environment_count

# Recorded ``args`` that do not change a run's results (the finished-run check skips them, fishr-collect keys its
# cells on every other): a run re-launched with other values of these
# (another data_dir mount, more processes, another save_model) is the same run.
# skipped_images is known only once the data is read: check_same_images compares it before a resume.
ARGS_THAT_DO_NOT_CHANGE_RESULTS = frozenset(
    {"output_dir", "data_dir", "ckpt_path", "save_model", "world_size", "skipped_images"}
)

RESULTS_FILE = "results.jsonl"
# The averaged model's record (averaging=swad|ema), beside DomainBed's: DomainBed's collect_results.py
# reads results.jsonl only, fishr-collect reads both (the averaged runs are rows of their own).
AVERAGED_FILE = "averaged.jsonl"
DONE_FILE = "done"


class SweepError(Exception):
    """A problem with the sweep directory that the user must fix; its message says how."""


def _record_problem(record: object) -> str | None:
    """What is missing from a record for model selection, or ``None`` when it is usable."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if not isinstance(record.get("step"), (int, float)):
        return "no numeric 'step'"
    arguments = record.get("args")
    if not isinstance(arguments, dict):
        return "no 'args' object (DomainBed's record format puts dataset, algorithm, test_envs, ... there)"
    for key in ("dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed"):
        if key not in arguments:
            return f"'args' has no '{key}'"
    for key in ("dataset", "algorithm"):
        if not isinstance(arguments[key], str):
            return f"'args.{key}' must be a name, found {arguments[key]!r}"
    for key in ("hparams_seed", "trial_seed"):
        if isinstance(arguments[key], bool) or not isinstance(arguments[key], int):
            return f"'args.{key}' must be an integer, found {arguments[key]!r}"
    test_envs = arguments["test_envs"]
    if not isinstance(test_envs, list) or not test_envs or not all(isinstance(env, int) for env in test_envs):
        return f"'args.test_envs' must be a non-empty list of domain indices, found {test_envs!r}"
    domain_count = environment_count(record)
    if domain_count == 0:
        return "no 'env0_out_acc' (every checkpoint reports env{i}_in_acc and env{i}_out_acc per domain)"
    for index in range(domain_count):
        for split in ("in", "out"):
            if not isinstance(record.get(f"env{index}_{split}_acc"), (int, float)):
                return f"no numeric 'env{index}_{split}_acc'"
    if max(test_envs) >= domain_count or min(test_envs) < 0:
        return f"test_envs {test_envs} out of range for the {domain_count} domains it reports"
    return None


def read_run(results_path: Path, strict: bool) -> list[Record]:
    """A run's records. ``strict`` (complete runs): any unreadable line is an error naming file and line.

    Incomplete runs are read leniently: a run killed mid-write may end in a partial line.
    """
    records = []
    # Undecodable bytes become U+FFFD, so that such a line fails as invalid JSON with its line number.
    with results_path.open(encoding="utf-8", errors="replace") as results_file:
        for line_number, line in enumerate(results_file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if not strict:
                    continue
                raise SweepError(
                    f"{results_path}:{line_number}: not valid JSON ({error.msg}). Each line of results.jsonl "
                    "must be one JSON record in DomainBed's format. Fix or delete that line, or delete the "
                    f"run's '{DONE_FILE}' marker so that the run is reported as incomplete and re-run."
                ) from None
            problem = _record_problem(record)
            if problem is not None:
                if not strict:
                    continue
                raise SweepError(
                    f"{results_path}:{line_number}: {problem}. fishr-collect reads DomainBed's record format "
                    "(step, env{i}_in_acc, env{i}_out_acc for every domain, args with dataset, algorithm, "
                    "test_envs, hparams_seed, trial_seed), as written by `python train.py` or DomainBed's "
                    "train.py. Fix the record, or move that run out of the sweep directory."
                )
            if records and strict and record["step"] <= records[-1]["step"]:
                # Two processes that wrote one run directory interleave their records (issue 19).
                raise SweepError(
                    f"{results_path}:{line_number}: step {record['step']} follows step {records[-1]['step']}; a "
                    "run's steps only increase, so two runs wrote this file (launched twice into one directory, "
                    "before the app locked run directories). Re-run it: delete its directory, or its "
                    f"'{DONE_FILE}' marker and {RESULTS_FILE}, and launch the sweep again."
                )
            records.append(record)
    return records


def read_records(run_dir: str | Path) -> list[Record]:
    """The run's records so far; a line cut short by a killed run is left out, so that it can resume."""
    path = Path(run_dir) / RESULTS_FILE
    return read_run(path, strict=False) if path.exists() else []


@dataclass
class Run:
    """One run directory: its records and whether its ``done`` marker exists."""

    directory: Path
    records: list[Record] = field(default_factory=list)
    complete: bool = False
    averaged: bool = False  # the averaged model's record (averaged.jsonl), not the run's checkpoints


@dataclass
class Sweep:
    directory: Path
    complete_runs: list[Run]
    incomplete_runs: list[Run]

    @property
    def records(self) -> list[Record]:
        return [record for run in self.complete_runs for record in run.records]


def load_sweep(sweep_directory: Path) -> Sweep:
    """Every run under ``sweep_directory`` (searched recursively), split by its ``done`` marker."""
    if not sweep_directory.is_dir():
        raise SweepError(
            f"{sweep_directory} is not a directory. Pass the sweep directory that `python train.py -m ...` "
            "wrote (hydra.sweep.dir, e.g. sweeps/domainbed), or a DomainBed sweep's output_dir."
        )
    results_paths = sorted(sweep_directory.rglob(RESULTS_FILE))
    if not results_paths:
        raise SweepError(
            f"No {RESULTS_FILE} under {sweep_directory}. fishr-collect expects a sweep directory whose run "
            f"directories each hold {RESULTS_FILE} (one JSON line per checkpoint) and a '{DONE_FILE}' marker, "
            "as `python train.py -m +sweep=domainbed` writes them (or DomainBed's sweep). Check the path, or "
            "start the sweep first."
        )
    complete_runs, incomplete_runs = [], []
    for results_path in results_paths:
        complete = (results_path.parent / DONE_FILE).exists()
        run = Run(results_path.parent, read_run(results_path, strict=complete), complete)
        (complete_runs if complete and run.records else incomplete_runs).append(run)
        averaged_path = results_path.parent / AVERAGED_FILE
        if complete and averaged_path.exists():  # args.algorithm names the averaging: "Fishr + SWAD"
            complete_runs.append(Run(results_path.parent, read_run(averaged_path, strict=True), True, averaged=True))
    return Sweep(sweep_directory, complete_runs, incomplete_runs)
