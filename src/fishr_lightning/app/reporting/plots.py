"""PNG plots of a sweep (matplotlib, Agg canvas: no display needed).

- per run, :func:`plot_run`: the Fishr penalty (log scale) and every domain's ``in``/``out`` accuracy
  over steps, the test domains drawn bold;
- per results table, :func:`plot_results_table`: accuracy per test domain per algorithm, bars at the
  mean over trials with standard-error whiskers.

``fishr-collect SWEEP_DIR --plots DIR`` calls :func:`write_sweep_plots`, which writes
``DIR/runs/<run directory relative to the sweep, '/' as '__'>.png`` and
``DIR/<dataset>_<selection method>.png``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fishr_lightning.app.reporting.model_selection import Record, ResultsTable, environment_count

if TYPE_CHECKING:
    from fishr_lightning.app.reporting.model_selection import MethodTables
    from fishr_lightning.app.reporting.records import Sweep

# The record key of the penalty, in DomainBed's records (its Fishr) and ours (results.py).
PENALTY_KEY = "penalty"


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+,\[\]-]+", "_", text).strip("_") or "run"


def plot_run(records: Sequence[Record], path: Path, title: str = "") -> Path:
    """One run: penalty over steps (left); every domain's in (solid) and out (dotted) accuracy, test domains bold."""
    records = sorted(records, key=lambda record: record["step"])
    steps = [record["step"] for record in records]
    figure = Figure(figsize=(11, 4), layout="constrained")
    penalty_axes, accuracy_axes = figure.subplots(1, 2)

    points = [(record["step"], record[PENALTY_KEY]) for record in records if PENALTY_KEY in record]
    if not points:
        penalty_axes.text(
            0.5, 0.5, "no penalty recorded (ERM)", ha="center", va="center", transform=penalty_axes.transAxes
        )
    else:
        penalty_axes.plot([step for step, _ in points], [value for _, value in points], marker="o", markersize=3)
        if all(value > 0 for _, value in points):
            penalty_axes.set_yscale("log")
    penalty_axes.set_xlabel("step")
    penalty_axes.set_title("penalty")

    test_envs = set(records[0]["args"]["test_envs"]) if records else set()
    for env in range(environment_count(records[0]) if records else 0):
        role = "test" if env in test_envs else "train"
        for split, line_style in (("in", "-"), ("out", ":")):
            accuracies = [record[f"env{env}_{split}_acc"] for record in records]
            accuracy_axes.plot(
                steps,
                accuracies,
                line_style,
                color=f"C{env}",
                linewidth=2.5 if role == "test" else 1.2,
                marker="o",
                markersize=3,
                label=f"env{env} {split} ({role})",
            )
    accuracy_axes.set_xlabel("step")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_title("accuracy per domain")
    accuracy_axes.legend(fontsize="small", ncols=2)
    if title:
        figure.suptitle(title, fontsize="medium")
    return _save(figure, path)


def plot_results_table(table: ResultsTable, path: Path) -> Path:
    """Grouped bars: x = test domains, one bar per algorithm at the mean over trials, standard-error whiskers."""
    figure = Figure(figsize=(max(5, 1.6 * len(table.column_labels) + 2), 4), layout="constrained")
    axes = figure.subplots()
    bar_width = 0.8 / max(1, len(table.algorithms))
    for index, algorithm in enumerate(table.algorithms):
        positions = [
            column + (index - (len(table.algorithms) - 1) / 2) * bar_width for column in range(len(table.column_labels))
        ]
        cells = table.cells[algorithm]
        # A missing cell (DomainBed's "X") draws no bar.
        means = [100 * cell.mean if cell else math.nan for cell in cells]
        errors = [100 * cell.standard_error if cell else math.nan for cell in cells]
        axes.bar(positions, means, bar_width, yerr=errors, capsize=3, label=algorithm)
    axes.set_xticks(range(len(table.column_labels)), table.column_labels)
    axes.set_xlabel("test domain")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(table.title, fontsize="medium")
    axes.legend()
    return _save(figure, path)


def write_sweep_plots(sweep: Sweep, tables: Sequence[MethodTables], directory: Path) -> list[Path]:
    """Every run's plot (incomplete runs too, titled so) and one plot per dataset and selection method."""
    written = []
    for run in [*sweep.complete_runs, *sweep.incomplete_runs]:
        if not run.records or run.averaged:  # one final record: it is in the tables' plots
            continue
        relative = run.directory.relative_to(sweep.directory).as_posix()
        title = relative if run.complete else f"{relative} (incomplete)"
        written.append(
            plot_run(run.records, directory / "runs" / f"{_file_name(relative.replace('/', '__'))}.png", title)
        )
    for method_tables in tables:
        for table in method_tables.dataset_tables:
            name = f"{_file_name(table.dataset or table.title)}_{method_tables.method.short_name}.png"
            written.append(plot_results_table(table, directory / name))
    return written
