"""DomainBed's model selection over ``results.jsonl`` records, as pure functions.

A *record* is one JSON line of a run's ``results.jsonl`` (one per checkpoint), in DomainBed's format:
``step``, ``env{i}_in_acc`` / ``env{i}_out_acc`` for every domain ``i``, loss terms, ``hparams`` and
``args`` (``dataset``, ``algorithm``, ``test_envs``, ``hparams_seed``, ``trial_seed``, ...).

The three selection methods are those of Gulrajani & Lopez-Paz, *In Search of Lost Domain
Generalization* (ICLR 2021), implemented as in DomainBed's ``domainbed/model_selection.py``:

- training-domain validation (``IIDAccuracySelectionMethod``): per run, the checkpoint with the best
  mean ``out`` accuracy over the *training* domains;
- test-domain validation, the oracle (``OracleSelectionMethod``): per run, the *last* checkpoint (no
  early stopping), validated on the test domain's ``out`` split;
- leave-one-domain-out cross-validation (``LeaveOneOutSelectionMethod``): needs, besides the run with
  test domain ``t``, runs with test domains ``{t, v}`` for every other ``v``; at each step the
  validation accuracy is the mean over ``v`` of domain ``v``'s ``in`` accuracy in the ``{t, v}`` run.

For each (trial_seed, dataset, algorithm, test domain) group, the hyperparameters (``hparams_seed``)
with the best validation accuracy are chosen and their test accuracy — the test domain's ``in`` split,
as DomainBed reports it — is the group's result. Tables report, per test domain, the mean and standard
error of that result over trials.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Record = dict

__all__ = [
    "LEAVE_ONE_DOMAIN_OUT",
    "SELECTION_METHODS",
    "TEST_DOMAIN_VALIDATION",
    "TRAINING_DOMAIN_VALIDATION",
    "GroupKey",
    "MeanAndError",
    "ResultsTable",
    "SelectedAccuracy",
    "SelectionMethod",
    "averages_table",
    "environment_count",
    "group_records_by_test_domain",
    "leave_one_domain_out_accuracy",
    "mean_and_standard_error",
    "results_table",
    "best_hparams_seed",
    "selected_accuracies",
    "selected_hparams",
    "sweep_accuracy",
    "test_domain_validation_accuracy",
    "training_domain_validation_accuracy",
]


@dataclass(frozen=True)
class SelectedAccuracy:
    """The validation accuracy a selection method maximises and the test accuracy it then reports."""

    val_acc: float
    test_acc: float


@dataclass(frozen=True)
class GroupKey:
    """One cell of DomainBed's protocol before averaging over trials."""

    trial_seed: int
    dataset: str
    algorithm: str
    test_env: int


@dataclass(frozen=True)
class MeanAndError:
    """Mean and standard error over trials, as fractions (tables print them ×100)."""

    mean: float
    standard_error: float
    trials: int


def environment_count(record: Record) -> int:
    """How many domains a record reports: ``env0_out_acc``, ``env1_out_acc``, ... up to the first gap."""
    for index in itertools.count():
        if f"env{index}_out_acc" not in record:
            return index
    raise AssertionError("unreachable")


def _test_envs(record: Record) -> list[int]:
    return list(record["args"]["test_envs"])


def _single_test_domain_records(records: Iterable[Record]) -> list[Record]:
    # DomainBed's get_test_records: only runs with exactly one test domain are evaluated directly; runs
    # with two test domains exist only to serve as leave-one-out validation.
    return [record for record in records if len(_test_envs(record)) == 1]


def training_domain_validation_accuracy(run_records: Sequence[Record]) -> SelectedAccuracy | None:
    """DomainBed's ``IIDAccuracySelectionMethod.run_acc``: best checkpoint by mean training-domain ``out`` acc.

    Ties between checkpoints go to the first one in record order, as Python's ``max`` does in DomainBed.
    """
    test_records = _single_test_domain_records(run_records)
    if not test_records:
        return None

    def checkpoint_accuracy(record: Record) -> SelectedAccuracy:
        test_env = _test_envs(record)[0]
        validation_accuracies = [
            record[f"env{env}_out_acc"] for env in range(environment_count(record)) if env != test_env
        ]
        return SelectedAccuracy(
            val_acc=sum(validation_accuracies) / len(validation_accuracies),
            test_acc=record[f"env{test_env}_in_acc"],
        )

    return max((checkpoint_accuracy(record) for record in test_records), key=lambda accuracy: accuracy.val_acc)


def test_domain_validation_accuracy(run_records: Sequence[Record]) -> SelectedAccuracy | None:
    """DomainBed's ``OracleSelectionMethod.run_acc``: the last checkpoint, validated on the test domain's ``out``."""
    test_records = _single_test_domain_records(run_records)
    if not test_records:
        return None
    test_env = _test_envs(test_records[0])[0]
    # The last of equal steps (pooled duplicate runs) as DomainBed's stable sort then [-1]: reversed, then max.
    last_record = max(reversed(test_records), key=lambda record: record["step"])
    return SelectedAccuracy(
        val_acc=last_record[f"env{test_env}_out_acc"],
        test_acc=last_record[f"env{test_env}_in_acc"],
    )


def _leave_one_domain_out_step_accuracy(step_records: Sequence[Record]) -> SelectedAccuracy | None:
    test_records = _single_test_domain_records(step_records)
    if len(test_records) != 1:
        return None
    test_env = _test_envs(test_records[0])[0]
    domain_count = environment_count(step_records[0])
    validation_accuracy_by_domain: dict[int, float] = {}
    for record in step_records:
        if len(_test_envs(record)) == 2:
            (validation_env,) = set(_test_envs(record)) - {test_env}
            # The held-out validation domain is never trained on, so DomainBed scores its larger `in` split.
            validation_accuracy_by_domain[validation_env] = record[f"env{validation_env}_in_acc"]
    validation_envs = [env for env in range(domain_count) if env != test_env]
    if any(env not in validation_accuracy_by_domain for env in validation_envs):
        return None
    return SelectedAccuracy(
        val_acc=sum(validation_accuracy_by_domain[env] for env in validation_envs) / (domain_count - 1),
        test_acc=test_records[0][f"env{test_env}_in_acc"],
    )


def leave_one_domain_out_accuracy(run_records: Sequence[Record]) -> SelectedAccuracy | None:
    """DomainBed's ``LeaveOneOutSelectionMethod.run_acc`` over the records of one hparams_seed.

    ``run_records`` pools the run with test domain ``t`` and the runs with test domains ``{t, v}``; a step
    counts only where all of them have a checkpoint. Ties go to the earliest step.
    """
    records_by_step: dict[int, list[Record]] = defaultdict(list)
    for record in run_records:
        records_by_step[record["step"]].append(record)
    step_accuracies = [
        accuracy
        for step in sorted(records_by_step)
        if (accuracy := _leave_one_domain_out_step_accuracy(records_by_step[step])) is not None
    ]
    if not step_accuracies:
        return None
    return max(step_accuracies, key=lambda accuracy: accuracy.val_acc)


@dataclass(frozen=True)
class SelectionMethod:
    """A model selection method: DomainBed's name for it and how it scores the records of one run."""

    name: str
    short_name: str
    run_accuracy: Callable[[Sequence[Record]], SelectedAccuracy | None]


TRAINING_DOMAIN_VALIDATION = SelectionMethod(
    "training-domain validation set", "training_domain", training_domain_validation_accuracy
)
LEAVE_ONE_DOMAIN_OUT = SelectionMethod(
    "leave-one-domain-out cross-validation", "leave_one_domain_out", leave_one_domain_out_accuracy
)
TEST_DOMAIN_VALIDATION = SelectionMethod(
    "test-domain validation set (oracle)", "test_domain_oracle", test_domain_validation_accuracy
)
# DomainBed's collect_results.py prints them in this order.
SELECTION_METHODS = (TRAINING_DOMAIN_VALIDATION, LEAVE_ONE_DOMAIN_OUT, TEST_DOMAIN_VALIDATION)


def group_records_by_test_domain(records: Iterable[Record]) -> dict[GroupKey, list[Record]]:
    """DomainBed's ``get_grouped_records``: a record with test domains ``[t, v]`` joins both groups ``t`` and ``v``."""
    groups: dict[GroupKey, list[Record]] = defaultdict(list)
    for record in records:
        arguments = record["args"]
        for test_env in arguments["test_envs"]:
            key = GroupKey(arguments["trial_seed"], arguments["dataset"], arguments["algorithm"], test_env)
            groups[key].append(record)
    return dict(groups)


def best_hparams_seed(group: Sequence[Record], method: SelectionMethod) -> tuple[int, SelectedAccuracy] | None:
    """The ``hparams_seed`` a selection method picks within one group, and its accuracy.

    Records are pooled per ``hparams_seed``. Ties in validation accuracy go to the largest
    ``hparams_seed``, as DomainBed's stable ascending sort followed by a reversal does.
    """
    records_by_hparams_seed: dict[int, list[Record]] = defaultdict(list)
    for record in group:
        records_by_hparams_seed[record["args"]["hparams_seed"]].append(record)
    best: tuple[int, SelectedAccuracy] | None = None
    for hparams_seed in sorted(records_by_hparams_seed):
        accuracy = method.run_accuracy(records_by_hparams_seed[hparams_seed])
        if accuracy is not None and (best is None or accuracy.val_acc >= best[1].val_acc):
            best = (hparams_seed, accuracy)
    return best


def sweep_accuracy(group: Sequence[Record], method: SelectionMethod) -> SelectedAccuracy | None:
    """DomainBed's ``SelectionMethod.sweep_acc``: the best hyperparameters' accuracy within one group."""
    best = best_hparams_seed(group, method)
    return None if best is None else best[1]


def selected_accuracies(records: Iterable[Record], method: SelectionMethod) -> dict[GroupKey, float]:
    """The selected test accuracy of every (trial, dataset, algorithm, test domain) group that has one."""
    selected = {}
    for key, group in group_records_by_test_domain(records).items():
        accuracy = sweep_accuracy(group, method)
        if accuracy is not None:
            selected[key] = accuracy.test_acc
    return selected


def selected_hparams(records: Iterable[Record], method: SelectionMethod) -> dict[GroupKey, tuple[int, dict]]:
    """Per group, the ``hparams_seed`` the method selects and that run's hyperparameters (its records' ``hparams``)."""
    selected = {}
    for key, group in group_records_by_test_domain(records).items():
        best = best_hparams_seed(group, method)
        if best is not None:
            hparams = next(r.get("hparams", {}) for r in group if r["args"]["hparams_seed"] == best[0])
            selected[key] = (best[0], hparams)
    return selected


def mean_and_standard_error(values: Sequence[float]) -> MeanAndError | None:
    """Mean and standard error as DomainBed's ``format_mean``: population std (ddof=0) divided by sqrt(n)."""
    if not values:
        return None
    count = len(values)
    mean = sum(values) / count
    population_variance = sum((value - mean) ** 2 for value in values) / count
    return MeanAndError(mean=mean, standard_error=math.sqrt(population_variance) / math.sqrt(count), trials=count)


@dataclass(frozen=True)
class ResultsTable:
    """Rows are algorithms, columns the test domains (or datasets); ``average`` is DomainBed's Avg column.

    A cell is ``None`` where no trial has a selected result (DomainBed prints ``X``); ``average`` is the mean
    of the row's cell means, ``None`` as soon as one cell is missing.
    """

    title: str
    column_labels: list[str]
    algorithms: list[str]
    cells: dict[str, list[MeanAndError | None]]
    dataset: str | None = None

    def average(self, algorithm: str) -> float | None:
        row = self.cells[algorithm]
        if not row or any(cell is None for cell in row):
            return None
        return sum(cell.mean for cell in row) / len(row)


def results_table(
    selected: dict[GroupKey, float],
    dataset: str,
    algorithms: Sequence[str],
    environment_labels: Sequence[str],
    title: str = "",
) -> ResultsTable:
    """One dataset's table: per algorithm and test domain, mean ± standard error over trials."""
    cells: dict[str, list[MeanAndError | None]] = {}
    for algorithm in algorithms:
        cells[algorithm] = [
            mean_and_standard_error(
                [
                    accuracy
                    for key, accuracy in sorted(selected.items(), key=lambda item: item[0].trial_seed)
                    if (key.dataset, key.algorithm, key.test_env) == (dataset, algorithm, test_env)
                ]
            )
            for test_env in range(len(environment_labels))
        ]
    return ResultsTable(title or dataset, list(environment_labels), list(algorithms), cells, dataset)


def averages_table(
    selected: dict[GroupKey, float], datasets: Sequence[str], algorithms: Sequence[str], title: str = "Averages"
) -> ResultsTable:
    """DomainBed's averages table: per trial, the mean over its test domains; then mean ± error over trials."""
    cells: dict[str, list[MeanAndError | None]] = {}
    for algorithm in algorithms:
        row = []
        for dataset in datasets:
            accuracies_by_trial: dict[int, list[float]] = defaultdict(list)
            for key, accuracy in selected.items():
                if (key.dataset, key.algorithm) == (dataset, algorithm):
                    accuracies_by_trial[key.trial_seed].append(accuracy)
            trial_means = [sum(values) / len(values) for _, values in sorted(accuracies_by_trial.items())]
            row.append(mean_and_standard_error(trial_means))
        cells[algorithm] = row
    return ResultsTable(title, list(datasets), list(algorithms), cells)


@dataclass
class MethodTables:
    """All tables of one selection method; empty ``dataset_tables`` when the sweep has no runs it can use."""

    method: SelectionMethod
    dataset_tables: list[ResultsTable]
    averages: ResultsTable | None
