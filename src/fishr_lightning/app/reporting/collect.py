"""``fishr-collect SWEEP_DIR``: DomainBed-style result tables from a sweep's ``results.jsonl`` files.

Reads every ``results.jsonl`` under ``SWEEP_DIR`` (ours, from ``python train.py -m ...``, and DomainBed's
own sweeps: the record format is the same). A run counts only when its directory also holds the ``done``
marker; runs without it are listed as incomplete and left out of the tables. Prints, per model selection
method (training-domain validation, leave-one-domain-out where runs with two test domains exist,
test-domain oracle) and per dataset, a table with algorithms as rows, test domains and Avg as columns,
and mean ± standard error over trials, then DomainBed's averages table over datasets.

    fishr-collect sweeps/domainbed                      # Markdown on stdout
    fishr-collect sweeps/domainbed --format latex --output results.tex
    fishr-collect sweeps/domainbed --plots plots/       # also PNGs, see plots.py
    fishr-collect sweeps/comparison --hparams           # also the hyperparameters each cell selected
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fishr_lightning.app import AppError
from fishr_lightning.app.data.specs import dataset_spec
from fishr_lightning.app.reporting.model_selection import (
    SELECTION_METHODS,
    MethodTables,
    Record,
    ResultsTable,
    SelectionMethod,
    averages_table,
    environment_count,
    results_table,
    selected_accuracies,
    selected_hparams,
)
from fishr_lightning.app.reporting.records import DONE_FILE, RESULTS_FILE, Sweep, SweepError, load_sweep

# DomainBed's datasets.DATASETS order for tables; other datasets follow alphabetically.
DATASET_ORDER = [
    "Debug28",
    "Debug224",
    "ColoredMNIST",
    "RotatedMNIST",
    "VLCS",
    "PACS",
    "OfficeHome",
    "TerraIncognita",
    "DomainNet",
]


def environment_labels(dataset: str, domain_count: int) -> list[str]:
    """Column labels for a dataset's test domains: the app's (DomainBed's) domain names, else ``env0``, ``env1``, ..."""

    try:
        names = dataset_spec(dataset).environments
    except AppError:
        names = ()
    if len(names) == domain_count:
        return list(names)
    return [f"env{index}" for index in range(domain_count)]


def _algorithm_order(algorithm: str) -> tuple[bool, str]:
    # DomainBed's tables put ERM, the baseline, first.
    return (algorithm.lower() != "erm", algorithm.lower())


def _dataset_order(dataset: str) -> tuple[int, str]:
    position = DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)
    return (position, dataset)


def build_tables(records: Sequence[Record]) -> list[MethodTables]:
    """Per selection method, one table per dataset and the averages table, as DomainBed's collect_results."""
    algorithms = sorted({record["args"]["algorithm"] for record in records}, key=_algorithm_order)
    datasets = sorted({record["args"]["dataset"] for record in records}, key=_dataset_order)
    domain_counts = {}
    for record in records:
        dataset = record["args"]["dataset"]
        domain_counts[dataset] = max(domain_counts.get(dataset, 0), environment_count(record))
    all_tables = []
    for method in SELECTION_METHODS:
        selected = selected_accuracies(records, method)
        if not selected:
            all_tables.append(MethodTables(method, [], None))
            continue
        dataset_tables = [
            results_table(
                selected,
                dataset,
                algorithms,
                environment_labels(dataset, domain_counts[dataset]),
                title=f"Dataset: {dataset}, model selection method: {method.name}",
            )
            for dataset in datasets
        ]
        averages = averages_table(
            selected, datasets, algorithms, title=f"Averages, model selection method: {method.name}"
        )
        all_tables.append(MethodTables(method, dataset_tables, averages))
    return all_tables


def _cell_text(table: ResultsTable, algorithm: str, plus_minus: str) -> list[str]:
    cells = [
        "X" if cell is None else f"{100 * cell.mean:.1f} {plus_minus} {100 * cell.standard_error:.1f}"
        for cell in table.cells[algorithm]
    ]
    average = table.average(algorithm)
    return cells + ["X" if average is None else f"{100 * average:.1f}"]


def _incomplete_run_lines(sweep: Sweep) -> list[str]:
    lines = []
    for run in sweep.incomplete_runs:
        relative = run.directory.relative_to(sweep.directory)
        if run.complete:
            lines.append(f"{relative}: has '{DONE_FILE}' but no records")
        elif run.records:
            lines.append(f"{relative}: {len(run.records)} checkpoints, last step {run.records[-1]['step']}")
        else:
            lines.append(f"{relative}: no checkpoint yet")
    return lines


LEAVE_ONE_OUT_HINT = (
    "no results: this method needs, for each test domain t, runs with test_envs=[t,v] for every other "
    "domain v (same hparams_seed and trial_seed) besides the run with test_envs=[t]."
)


def _no_results_text(method: SelectionMethod) -> str:
    return LEAVE_ONE_OUT_HINT if method.short_name == "leave_one_domain_out" else "no results."


# Registry entries every run of the app has the same value of: left out of the --hparams tables.
CONSTANT_HPARAMS = ("data_augmentation", "resnet18", "class_balanced", "nonlinear_classifier")


def _hparam_text(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def selected_hparams_rows(records: Sequence[Record], method: SelectionMethod) -> list[list[str]]:
    """Rows ``[dataset, algorithm, test domain, trial, hparams_seed, "name=value, ..."]``: what each cell of
    the method's tables selected, in the tables' order."""
    rows = []
    selected = selected_hparams(records, method)
    for key in sorted(
        selected, key=lambda k: (_dataset_order(k.dataset), _algorithm_order(k.algorithm), k.test_env, k.trial_seed)
    ):
        hparams_seed, hparams = selected[key]
        text = ", ".join(
            f"{name}={_hparam_text(value)}" for name, value in sorted(hparams.items()) if name not in CONSTANT_HPARAMS
        )
        rows.append([key.dataset, key.algorithm, str(key.test_env), str(key.trial_seed), str(hparams_seed), text])
    return rows


HPARAMS_HEADER = ["Dataset", "Algorithm", "Test domain", "Trial", "hparams_seed", "Hyperparameters"]


def format_markdown(sweep: Sweep, tables: list[MethodTables], show_hparams: bool = False) -> str:
    lines = [
        f"# Results: {sweep.directory}",
        "",
        f"Complete runs: {len(sweep.complete_runs)} ({len(sweep.records)} records).",
    ]
    if sweep.incomplete_runs:
        lines += ["", f"Incomplete runs (no '{DONE_FILE}' marker; not used): {len(sweep.incomplete_runs)}", ""]
        lines += [f"- {line}" for line in _incomplete_run_lines(sweep)]
    for method_tables in tables:
        lines += ["", f"## Model selection: {method_tables.method.name}", ""]
        if not method_tables.dataset_tables:
            lines.append(_no_results_text(method_tables.method))
            continue
        for table in [*method_tables.dataset_tables, method_tables.averages]:
            header = ["Algorithm", *table.column_labels, "Avg"]
            lines += [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            for algorithm in table.algorithms:
                lines.append("| " + " | ".join([algorithm, *_cell_text(table, algorithm, "±")]) + " |")
            lines.append("")
        if show_hparams:
            lines += [f"### Selected hyperparameters, model selection method: {method_tables.method.name}", ""]
            lines += ["| " + " | ".join(HPARAMS_HEADER) + " |", "|" + " --- |" * len(HPARAMS_HEADER)]
            lines += [
                "| " + " | ".join(row) + " |" for row in selected_hparams_rows(sweep.records, method_tables.method)
            ]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _latex_escaped(text: str) -> str:
    for character in "\\&%$#_{}":
        text = text.replace(character, "\\" + character)
    return text


def format_latex(sweep: Sweep, tables: list[MethodTables], show_hparams: bool = False) -> str:
    """A standalone document (booktabs, adjustbox) laid out like DomainBed's ``collect_results.py --latex``."""
    lines = [
        "\\documentclass{article}",
        "\\usepackage{booktabs}",
        "\\usepackage{adjustbox}",
        "\\begin{document}",
        "\\section{Full DomainBed results}",
        f"% Sweep: {sweep.directory}",
        f"% Complete runs: {len(sweep.complete_runs)}, records: {len(sweep.records)}",
    ]
    for line in _incomplete_run_lines(sweep):
        lines.append(f"% Incomplete run (not used): {line}")
    for method_tables in tables:
        lines += ["", f"\\subsection{{Model selection: {method_tables.method.name}}}"]
        if not method_tables.dataset_tables:
            lines.append(f"% {_no_results_text(method_tables.method)}")
            continue
        for table in [*method_tables.dataset_tables, method_tables.averages]:
            heading = table.dataset or "Averages"
            header = ["Algorithm", *table.column_labels, "Avg"]
            lines += [
                "",
                f"\\subsubsection{{{_latex_escaped(heading)}}}",
                "\\begin{center}",
                "\\adjustbox{max width=\\textwidth}{%",
                "\\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
                "\\toprule",
                " & ".join(f"\\textbf{{{_latex_escaped(label)}}}" for label in header) + " \\\\",
                "\\midrule",
            ]
            for algorithm in table.algorithms:
                row = [_latex_escaped(algorithm), *_cell_text(table, algorithm, "$\\pm$")]
                lines.append(" & ".join(row) + " \\\\")
            lines += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
        if show_hparams:  # as comments: the document's tables stay DomainBed's
            lines.append(f"% Selected hyperparameters ({method_tables.method.name}): " + ", ".join(HPARAMS_HEADER))
            lines += ["% " + " | ".join(row) for row in selected_hparams_rows(sweep.records, method_tables.method)]
    lines += ["", "\\end{document}"]
    return "\n".join(lines) + "\n"


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishr-collect",
        description="DomainBed-style result tables (mean ± standard error over trials) from a sweep directory.",
    )
    parser.add_argument("sweep_dir", type=Path, help="directory searched recursively for results.jsonl files")
    parser.add_argument("--format", choices=("markdown", "latex"), default="markdown", help="table format")
    parser.add_argument("--output", type=Path, help="write the tables to this file instead of stdout")
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="also write PNGs there: runs/<run>.png per run (penalty and every domain's accuracy over steps) "
        "and <dataset>_<selection method>.png per table (accuracy per test domain, error bars)",
    )
    parser.add_argument(
        "--hparams",
        action="store_true",
        help="also list, per selection method, the hparams_seed and hyperparameters each cell selected "
        "(per dataset, algorithm, test domain and trial)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _argument_parser().parse_args(argv)
    try:
        sweep = load_sweep(arguments.sweep_dir)
    except SweepError as error:
        print(f"fishr-collect: {error}", file=sys.stderr)
        return 2
    if not sweep.complete_runs:
        print(
            f"fishr-collect: none of the {len(sweep.incomplete_runs)} runs under {sweep.directory} is complete "
            f"(no '{DONE_FILE}' marker next to its {RESULTS_FILE}), so there is nothing to select from. "
            "Wait for the sweep to finish, or re-launch it (finished runs are skipped):\n  "
            + "\n  ".join(_incomplete_run_lines(sweep)),
            file=sys.stderr,
        )
        return 1
    tables = build_tables(sweep.records)
    formatter = format_latex if arguments.format == "latex" else format_markdown
    text = formatter(sweep, tables, show_hparams=arguments.hparams)
    if arguments.output is not None:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text)
        print(f"fishr-collect: wrote {arguments.output}")
    else:
        sys.stdout.write(text)
    if arguments.plots is not None:
        from fishr_lightning.app.reporting.plots import write_sweep_plots  # matplotlib only when plots are asked for

        written = write_sweep_plots(sweep, tables, arguments.plots)
        print(f"fishr-collect: wrote {len(written)} plots under {arguments.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
