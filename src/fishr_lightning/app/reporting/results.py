"""DomainBed's results format: ``results.jsonl`` in the run directory, one JSON record per evaluation,
so DomainBed's ``collect_results.py`` and model-selection code read our runs.

A record holds ``step`` (DomainBed's label: the step index, so the record at ``step`` follows
``step + 1`` updates), ``epoch``, ``env{i}_in_acc`` and ``env{i}_out_acc`` for every domain (test
domains included), the loss terms averaged over the steps since the previous record, as DomainBed's
``update()`` of the algorithm returns them (``loss``: the objective, penalty included, except for CORAL,
MMD and SD, whose ``loss`` is the cross-entropy alone; ``nll``; ``penalty``, the raw penalty, or
``<name>_penalty`` for each of several penalty callbacks; ``training/evaluation.py``'s ``step_losses``),
``step_time``, ``mem_gb``,
``hparams`` and ``args`` (``dataset``, ``algorithm``, ``test_envs``, ``hparams_seed``, ``trial_seed``,
``world_size``, ...). The training app (``training/evaluation.py``) builds the records; this module
writes and prints them, without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fishr_lightning.app.reporting.records import RESULTS_FILE, read_records

# DomainBed's peak CUDA memory field (torch.cuda.max_memory_allocated, in GiB): 0.0 where nothing measured it.
MEMORY_KEY = "mem_gb"


class RecordWriter:
    """Appends records to ``run_dir/results.jsonl`` and formats DomainBed's console table.

    Args:
        run_dir: the run directory.
        hparams: the run's hyperparameters (recorded as ``hparams``).
        args: the run's arguments (recorded as ``args``).
    """

    def __init__(self, run_dir: str | Path, hparams: dict[str, Any], args: dict[str, Any]) -> None:
        self.path = Path(run_dir) / RESULTS_FILE
        self.hparams = hparams
        self.args = args
        self._columns: list[str] | None = None  # the console table's, fixed by its header

    def keep_records_before(self, step: int) -> list[dict[str, Any]]:
        """Drops the records of steps ``>= step`` (a resumed run trains those steps again and writes
        their records again), and a line cut short by a killed run; returns the records kept."""
        records = [record for record in read_records(self.path.parent) if record["step"] < step]
        if self.path.exists():
            self.path.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
        return records

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as results_file:
            results_file.write(
                json.dumps({**record, "hparams": self.hparams, "args": self.args}, sort_keys=True) + "\n"
            )

    def table_rows(self, record: dict[str, Any]) -> list[str]:
        """DomainBed's console table: a header the first time, then one row per evaluation.

        ``mem_gb`` is a column only where it was measured (a CUDA device): on a CPU the record keeps
        DomainBed's field, 0.0 as DomainBed writes it there, but the table does not show it (issue 30)."""
        lines = []
        if self._columns is None:
            self._columns = [key for key in sorted(record) if key != MEMORY_KEY or record[key]]
            lines.append("  ".join(f"{key[:12]:<12}" for key in self._columns))
        lines.append("  ".join(format_cell(record.get(key)) for key in self._columns))
        return lines


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:<12.4f}"
    return f"{value!s:<12}"[:12]
