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
    fishr-collect sweeps/paper --layout paper           # the Fishr paper's Table 3: averages, its rows and columns

DomainBed groups records by (trial_seed, dataset, algorithm, test_envs, hparams_seed); the app records
more arguments that change an experiment (``backbone``, ``steps``, ``eval_augmentation``,
``data_pipeline``, ``precision``, an averaged record's ``averaging``, hand-set hyperparameters, ...). Runs that
differ in any of them are never pooled (issue 25): each setting is a row of its own, named after the
arguments in which the dataset's runs of one algorithm differ (``ERM [backbone=resnet50]``). Every
recorded argument counts, except DomainBed's grouping keys and the options the app itself treats as not
changing results (``records.ARGS_THAT_DO_NOT_CHANGE_RESULTS``), so an argument added later is keyed
by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
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
from fishr_lightning.app.reporting.records import (
    ARGS_THAT_DO_NOT_CHANGE_RESULTS,
    DONE_FILE,
    RESULTS_FILE,
    Sweep,
    SweepError,
    load_sweep,
)
from fishr_lightning.app.seeding import DOMAINBED_SEED, domainbed_sweep_seed
from fishr_lightning.domainbed.names import DOMAINBED_ALGORITHMS, PAPER_DATASETS, PAPER_TABLE_ROWS

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
    "SVIRO",
    "WILDSCamelyon",
    "WILDSFMoW",
    "SpawriousO2O_easy",
    "SpawriousO2O_medium",
    "SpawriousO2O_hard",
    "SpawriousM2M_easy",
    "SpawriousM2M_medium",
    "SpawriousM2M_hard",
]


def environment_labels(dataset: str, domain_count: int, data_dir: str | None = None) -> list[str]:
    """Column labels for a dataset's test domains: the app's (DomainBed's) domain names, else ``env0``, ``env1``, ...
    ``data_dir``: where the runs read it (``ImageFolders``' domains are its folders, when this machine sees them)."""

    try:
        names = dataset_spec(dataset, data_dir).environments
    except (AppError, OSError):
        names = ()
    if len(names) == domain_count:
        return list(names)
    return [f"env{index}" for index in range(domain_count)]


def _algorithm_order(algorithm: str) -> tuple[int, str, str]:
    """DomainBed's collect_results.py orders rows as its ``ALGORITHMS`` (ERM, the baseline, first), other names
    after, alphabetically; a row ``"Fishr [backbone=resnet18]"`` or ``"Fishr + SWAD"`` sits with its algorithm."""
    base = algorithm.split(" [")[0].split(" + ")[0]
    position = DOMAINBED_ALGORITHMS.index(base) if base in DOMAINBED_ALGORITHMS else len(DOMAINBED_ALGORITHMS)
    return (position, base.lower(), algorithm.lower())


def _dataset_order(dataset: str) -> tuple[int, str]:
    position = DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)
    return (position, dataset)


# DomainBed's grouping keys: where a record goes in the tables, not an axis of its experiment.
CELL_ARGS = frozenset({"dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed"})


def _is_domainbed_sweep_seed(arguments: dict) -> bool:
    """``seed`` is DomainBed's ``sweep.py`` seed of the record's cell (the presets' ``seed=domainbed``): it differs
    from run to run by construction. An averaged record's algorithm (``"Fishr + SWAD"``) names its averaging too."""
    algorithm = arguments["algorithm"]
    averaging = arguments.get("averaging")
    if isinstance(averaging, dict) and algorithm.endswith(f" + {averaging.get('name')}"):
        algorithm = algorithm.removesuffix(f" + {averaging['name']}")
    sweep_seed = domainbed_sweep_seed(
        arguments["dataset"], algorithm, arguments["test_envs"], arguments["hparams_seed"], arguments["trial_seed"]
    )
    return arguments.get("seed") == sweep_seed


def record_protocol(record: Record) -> str:
    """The DomainBed protocol of a record (issue 27): its ``args.protocol``; a record without one (the app's before
    the switch, DomainBed's own) is ``2024`` when its hyperparameters say ``resnet50_augmix`` (DomainBed's 2024
    registry), else ``classic``."""
    protocol = record["args"].get("protocol")
    if protocol is None:
        protocol = "2024" if (record.get("hparams") or {}).get("resnet50_augmix") else "classic"
    return str(protocol)


def experiment_arguments(record: Record) -> dict[str, str]:
    """The record's arguments that define its experiment beyond DomainBed's cell keys, as compact JSON: every
    recorded argument except ``CELL_ARGS`` and ``ARGS_THAT_DO_NOT_CHANGE_RESULTS`` (the list the app's
    finished-run check uses), a DomainBed sweep seed reading ``domainbed``, the protocol as ``record_protocol``."""
    arguments = {**record["args"], "protocol": record_protocol(record)}
    values = {
        name: json.dumps(value, sort_keys=True, separators=(",", ":"))
        for name, value in arguments.items()
        if name not in CELL_ARGS and name not in ARGS_THAT_DO_NOT_CHANGE_RESULTS
    }
    if "seed" in values and _is_domainbed_sweep_seed(arguments):
        values["seed"] = json.dumps(DOMAINBED_SEED)
    return values


def _label_value(text: str) -> str:
    """An argument's value in a row label: a name as it is, anything else as compact JSON."""
    value = json.loads(text)
    return value if isinstance(value, str) else text


def _hyperparameters(record: Record) -> dict[str, str]:
    """The record's hyperparameters as ``hparams.<name>`` -> compact JSON."""
    hparams = record.get("hparams") or {}
    return {
        f"hparams.{name}": json.dumps(value, sort_keys=True, separators=(",", ":")) for name, value in hparams.items()
    }


def _names_that_differ(group: Sequence[dict[str, str]]) -> set[str]:
    return {name for name in set().union(*group) if len({values.get(name) for values in group}) > 1}


# Arguments that differ between test domains by design: DiWA's shared initialisation is trained for one test
# domain (issue 29), so a sweep's runs start from one init per test domain. They are an experiment's axis
# only where runs of the same test domains differ in them.
PER_TEST_DOMAIN_ARGS = frozenset({"init_from", "init_sha256"})


def differing_arguments(records: Sequence[Record]) -> dict[str, list[str]]:
    """Per dataset, the arguments in which its records of one algorithm differ (a value, or whether it is
    recorded), and the hyperparameters (``hparams.<name>``) in which records of the same cell keys and
    arguments differ: the same ``hparams_seed`` draws the same hyperparameters, so those were set by hand
    (``+hparams.lr=...``, ``batch_size=...``) and are experiments of their own too."""
    arguments_by_algorithm: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    arguments_by_test_domains: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    hparams_by_run: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for record in records:
        arguments, experiment = record["args"], experiment_arguments(record)
        shared = {name: value for name, value in experiment.items() if name not in PER_TEST_DOMAIN_ARGS}
        arguments_by_algorithm[(arguments["dataset"], arguments["algorithm"])].append(shared)
        per_test_domains = {name: value for name, value in experiment.items() if name in PER_TEST_DOMAIN_ARGS}
        test_domains = json.dumps(arguments.get("test_envs"))
        arguments_by_test_domains[(arguments["dataset"], arguments["algorithm"], test_domains)].append(per_test_domains)
        run_key = (*(json.dumps(arguments[name]) for name in sorted(CELL_ARGS)), *sorted(experiment.items()))
        hparams_by_run[run_key].append(_hyperparameters(record))
    differing: dict[str, set[str]] = defaultdict(set)
    for (dataset, _), group in arguments_by_algorithm.items():
        differing[dataset] |= _names_that_differ(group)
    for (dataset, _, _), group in arguments_by_test_domains.items():
        differing[dataset] |= _names_that_differ(group)
    for run_key, group in hparams_by_run.items():
        dataset = json.loads(run_key[sorted(CELL_ARGS).index("dataset")])
        differing[dataset] |= _names_that_differ(group)
    return {dataset: sorted(names) for dataset, names in differing.items() if names}


def key_experiments(sweep: Sweep) -> dict[str, list[str]]:
    """Keys the complete runs' records on their experiment (issue 25): where a dataset's runs of one algorithm
    differ in an argument, every record of that dataset is relabelled ``algorithm [name=value, ...]`` with its
    values of those arguments, so that no cell pools two experiments and every row says which it is. Returns
    the differing arguments per dataset (none: the records are left as they are)."""
    differing = differing_arguments(sweep.records)
    for run in sweep.complete_runs:
        labelled = []
        for record in run.records:
            names = differing.get(record["args"]["dataset"], [])
            values = {**experiment_arguments(record), **_hyperparameters(record)}
            shown = [f"{name}={_label_value(values[name])}" for name in names if name in values]
            if shown:
                record = {**record, "args": {**record["args"]}}
                record["args"]["algorithm"] = f"{record['args']['algorithm']} [{', '.join(shown)}]"
            labelled.append(record)
        run.records = labelled
    return differing


def build_tables(records: Sequence[Record]) -> list[MethodTables]:
    """Per selection method, one table per dataset and the averages table, as DomainBed's collect_results."""
    algorithms = sorted({record["args"]["algorithm"] for record in records}, key=_algorithm_order)
    datasets = sorted({record["args"]["dataset"] for record in records}, key=_dataset_order)
    domain_counts, data_dirs = {}, {}
    for record in records:
        dataset = record["args"]["dataset"]
        domain_counts[dataset] = max(domain_counts.get(dataset, 0), environment_count(record))
        data_dirs.setdefault(dataset, record["args"].get("data_dir"))
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
                environment_labels(dataset, domain_counts[dataset], data_dirs[dataset]),
                title=f"Dataset: {dataset}, model selection method: {method.name}",
            )
            for dataset in datasets
        ]
        averages = averages_table(
            selected, datasets, algorithms, title=f"Averages, model selection method: {method.name}"
        )
        all_tables.append(MethodTables(method, dataset_tables, averages))
    return all_tables


# The Fishr paper's Tables 3-4: training-domain validation and the oracle, its averages over datasets.
PAPER_SELECTION_METHODS = ("training_domain", "test_domain_oracle")


def paper_layout(tables: list[MethodTables]) -> list[MethodTables]:
    """The tables as the Fishr paper's Table 3 (issue 26): per selection method of the paper, only the averages
    table, its rows in the paper's order under the paper's labels (other rows after, as they are), its columns
    the paper's datasets in its order (a dataset the sweep lacks stays out; the Avg of the columns shown)."""
    labels = dict(PAPER_TABLE_ROWS)
    order = [name for name, _ in PAPER_TABLE_ROWS]
    laid_out = []
    for method_tables in tables:
        if method_tables.method.short_name not in PAPER_SELECTION_METHODS:
            continue
        averages = method_tables.averages
        if averages is None:
            laid_out.append(MethodTables(method_tables.method, [], None))
            continue
        rows = sorted(
            averages.algorithms, key=lambda a: (order.index(a) if a in order else len(order), _algorithm_order(a))
        )
        columns = [i for i, dataset in enumerate(averages.column_labels) if dataset in PAPER_DATASETS]
        columns = sorted(columns, key=lambda i: PAPER_DATASETS.index(averages.column_labels[i]))
        columns += [i for i in range(len(averages.column_labels)) if i not in columns]
        table = ResultsTable(
            f"Table 3 layout (Rame et al. 2022), model selection: {method_tables.method.name}",
            [averages.column_labels[i] for i in columns],
            [labels.get(row, row) for row in rows],
            {labels.get(row, row): [averages.cells[row][i] for i in columns] for row in rows},
        )
        laid_out.append(MethodTables(method_tables.method, [], table))
    return laid_out


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


def _differing_lines(differing: dict[str, list[str]]) -> list[str]:
    return [
        f"{dataset}: runs of one algorithm differ in {', '.join(names)}; each setting is its own row."
        for dataset, names in sorted(differing.items(), key=lambda item: _dataset_order(item[0]))
    ]


def protocol_line(sweep: Sweep) -> str:
    """Which DomainBed protocol the tables come from (issue 27): classic (the published tables) or 2024."""
    protocols = sorted({record_protocol(record) for record in sweep.records})
    return f"Protocol{'s' if len(protocols) > 1 else ''}: {', '.join(protocols)}"


def format_markdown(
    sweep: Sweep, tables: list[MethodTables], show_hparams: bool = False, differing: dict[str, list[str]] | None = None
) -> str:
    lines = [
        f"# Results: {sweep.directory}",
        "",
        f"Complete runs: {len(sweep.complete_runs)} ({len(sweep.records)} records).",
        "",
        protocol_line(sweep),
    ]
    if differing:
        lines += ["", *(f"- {line}" for line in _differing_lines(differing))]
    if sweep.incomplete_runs:
        lines += ["", f"Incomplete runs (no '{DONE_FILE}' marker; not used): {len(sweep.incomplete_runs)}", ""]
        lines += [f"- {line}" for line in _incomplete_run_lines(sweep)]
    for method_tables in tables:
        lines += ["", f"## Model selection: {method_tables.method.name}", ""]
        if method_tables.averages is None:
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


def format_latex(
    sweep: Sweep, tables: list[MethodTables], show_hparams: bool = False, differing: dict[str, list[str]] | None = None
) -> str:
    """A standalone document (booktabs, adjustbox) laid out like DomainBed's ``collect_results.py --latex``."""
    lines = [
        "\\documentclass{article}",
        "\\usepackage{booktabs}",
        "\\usepackage{adjustbox}",
        "\\begin{document}",
        "\\section{Full DomainBed results}",
        f"% Sweep: {sweep.directory}",
        f"% Complete runs: {len(sweep.complete_runs)}, records: {len(sweep.records)}",
        f"% {protocol_line(sweep)}",
    ]
    for line in _incomplete_run_lines(sweep):
        lines.append(f"% Incomplete run (not used): {line}")
    lines += [f"% {line}" for line in _differing_lines(differing or {})]
    for method_tables in tables:
        lines += ["", f"\\subsection{{Model selection: {method_tables.method.name}}}"]
        if method_tables.averages is None:
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
    parser.add_argument(
        "--layout",
        choices=("domainbed", "paper"),
        default="domainbed",
        help="domainbed: every selection method's per-dataset and averages tables (DomainBed's collect_results); "
        "paper: the Fishr paper's Table 3, the averages over datasets under training-domain and oracle selection, "
        "rows in the paper's order",
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
    differing = key_experiments(sweep)
    tables = build_tables(sweep.records)
    shown = paper_layout(tables) if arguments.layout == "paper" else tables
    formatter = format_latex if arguments.format == "latex" else format_markdown
    text = formatter(sweep, shown, show_hparams=arguments.hparams, differing=differing)
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
