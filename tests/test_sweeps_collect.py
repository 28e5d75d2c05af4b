"""`fishr-collect` on hand-written sweeps: DomainBed's three selection methods, by hand.

Every expected number below was computed by hand from the fixture tables; the comments show the sums.
Accuracies are fractions in the records and percentages with one decimal in the tables, and the
standard error is DomainBed's: population standard deviation (ddof=0) over trials divided by sqrt(n).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fishr_lightning.app.reporting import collect, model_selection
from fishr_lightning.app.reporting.model_selection import (
    LEAVE_ONE_DOMAIN_OUT,
    TEST_DOMAIN_VALIDATION,
    TRAINING_DOMAIN_VALIDATION,
    GroupKey,
)

# ---------------------------------------------------------------------------------------------------------
# Fixture 1, our own format: dataset "toy" with 3 domains, algorithms erm and fishr, 2 hparams x 2 trials.
# Per checkpoint: step -> ((env0 in, env0 out), (env1 in, env1 out), (env2 in, env2 out)).
# ---------------------------------------------------------------------------------------------------------
# A table: each comment belongs to its line, so the formatter leaves it as laid out.
# fmt: off
TOY_RUNS = {
    # (algorithm, test_env, hparams_seed, trial_seed): {step: accuracies}
    # erm, test domain 0. Training-domain validation = mean(env1 out, env2 out); test = env0 in.
    ("erm", 0, 0, 0): {100: ((0.50, 0.52), (0.9, 0.80), (0.9, 0.70)),  # val .75
                       200: ((0.60, 0.40), (0.9, 0.90), (0.9, 0.80))},  # val .85 -> best, test .60
    ("erm", 0, 1, 0): {100: ((0.70, 0.72), (0.9, 0.84), (0.9, 0.84)),  # val .84 < .85: hparams 0 win
                       200: ((0.66, 0.68), (0.9, 0.82), (0.9, 0.80))},  # oracle: last out .68 > .40 -> test .66
    ("erm", 0, 0, 1): {100: ((0.55, 0.50), (0.9, 0.78), (0.9, 0.74)),
                       200: ((0.65, 0.62), (0.9, 0.88), (0.9, 0.86))},  # val .87; oracle out .62 > .60 -> .65
    ("erm", 0, 1, 1): {100: ((0.75, 0.70), (0.9, 0.90), (0.9, 0.90)),  # val .90 -> best, test .75
                       200: ((0.72, 0.60), (0.9, 0.86), (0.9, 0.84))},
    # fishr, test domain 0, with both kinds of ties.
    ("fishr", 0, 0, 0): {100: ((0.62, 0.64), (0.9, 0.80), (0.9, 0.80)),  # val .80, tied with step 200:
                         200: ((0.68, 0.70), (0.9, 0.80), (0.9, 0.80))},  # DomainBed keeps the first -> .62
    ("fishr", 0, 1, 0): {100: ((0.90, 0.30), (0.9, 0.70), (0.9, 0.70)),
                         200: ((0.88, 0.30), (0.9, 0.74), (0.9, 0.72))},  # val .73 < .80; oracle out .30 < .70
    ("fishr", 0, 0, 1): {100: ((0.70, 0.71), (0.9, 0.83), (0.9, 0.83)),  # val .83 ...
                         200: ((0.74, 0.73), (0.9, 0.80), (0.9, 0.80))},  # oracle out .73
    ("fishr", 0, 1, 1): {100: ((0.64, 0.60), (0.9, 0.83), (0.9, 0.83)),  # ... tied: DomainBed keeps the
                         200: ((0.66, 0.75), (0.9, 0.79), (0.9, 0.79))},  # larger hparams_seed -> .64; oracle .66
    # erm, test domains 1 and 2: one hparams draw, one checkpoint.
    ("erm", 1, 0, 0): {200: ((0.9, 0.8), (0.50, 0.45), (0.9, 0.7))},
    ("erm", 1, 0, 1): {200: ((0.9, 0.8), (0.60, 0.50), (0.9, 0.7))},
    ("erm", 2, 0, 0): {200: ((0.9, 0.8), (0.9, 0.8), (0.40, 0.30))},
    ("erm", 2, 0, 1): {200: ((0.9, 0.8), (0.9, 0.8), (0.40, 0.30))},
}
# fmt: on
# Training-domain validation, per trial:  erm env0 [.60, .75]  -> 67.5 ± 0.075/sqrt(2) = 5.3
#                                        erm env1 [.50, .60]  -> 55.0 ± 0.050/sqrt(2) = 3.5
#                                        erm env2 [.40, .40]  -> 40.0 ± 0.0;  Avg (67.5+55+40)/3 = 54.2
#                                        fishr env0 [.62, .64] -> 63.0 ± 0.010/sqrt(2) = 0.7
TOY_TRAINING_DOMAIN_TABLE = [
    "| Algorithm | env0 | env1 | env2 | Avg |",
    "| --- | --- | --- | --- | --- |",
    "| erm | 67.5 ± 5.3 | 55.0 ± 3.5 | 40.0 ± 0.0 | 54.2 |",
    "| fishr | 63.0 ± 0.7 | X | X | X |",
]
# Averages table: per trial the mean over test domains, erm (.6+.5+.4)/3 = .5 and (.75+.6+.4)/3 = .58333
# -> 54.2 ± 0.041667/sqrt(2) = 2.9.
TOY_TRAINING_DOMAIN_AVERAGES = ["| erm | 54.2 ± 2.9 | 54.2 |", "| fishr | 63.0 ± 0.7 | 63.0 |"]
# Test-domain (oracle) validation: erm env0 [.66, .65] -> 65.5 ± 0.005/sqrt(2) = 0.4; Avg (65.5+55+40)/3 = 53.5
#                                  fishr env0 [.68, .66] -> 67.0 ± 0.7
TOY_ORACLE_TABLE = [
    "| erm | 65.5 ± 0.4 | 55.0 ± 3.5 | 40.0 ± 0.0 | 53.5 |",
    "| fishr | 67.0 ± 0.7 | X | X | X |",
]
# erm per trial (.66+.5+.4)/3 = .52 and (.65+.6+.4)/3 = .55 -> 53.5 ± 0.015/sqrt(2) = 1.1
TOY_ORACLE_AVERAGES = ["| erm | 53.5 ± 1.1 | 53.5 |", "| fishr | 67.0 ± 0.7 | 67.0 |"]


def make_record(dataset, algorithm, test_envs, hparams_seed, trial_seed, step, accuracies, **extra) -> dict:
    record = {"step": step, "epoch": step / 50}
    for env, (in_acc, out_acc) in enumerate(accuracies):
        record[f"env{env}_in_acc"] = in_acc
        record[f"env{env}_out_acc"] = out_acc
    record.update(extra)
    record["hparams"] = {"lr": 5e-5, "batch_size": 32}
    record["args"] = {
        "dataset": dataset,
        "algorithm": algorithm,
        "test_envs": list(test_envs),
        "hparams_seed": hparams_seed,
        "trial_seed": trial_seed,
    }
    return record


def write_run(directory: Path, records: list[dict], done: bool = True, tail: str = "") -> Path:
    directory.mkdir(parents=True)
    (directory / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    if done:
        (directory / "done").write_text("done\n")
    return directory


def toy_records(algorithm, test_env, hparams_seed, trial_seed) -> list[dict]:
    checkpoints = TOY_RUNS[(algorithm, test_env, hparams_seed, trial_seed)]
    return [
        make_record(
            "toy",
            algorithm,
            [test_env],
            hparams_seed,
            trial_seed,
            step,
            accuracies,
            loss=0.5,
            penalty=0.0 if algorithm == "erm" else 1e-3 * step,
        )
        for step, accuracies in checkpoints.items()
    ]


@pytest.fixture
def toy_sweep(tmp_path: Path) -> Path:
    """Our layout: <sweep>/<override_dirname>/results.jsonl + done; one incomplete run that would win."""
    sweep = tmp_path / "toy_sweep"
    for algorithm, test_env, hparams_seed, trial_seed in TOY_RUNS:
        name = f"algorithm={algorithm},hparams_seed={hparams_seed},test_envs=[{test_env}],trial_seed={trial_seed}"
        write_run(sweep / name, toy_records(algorithm, test_env, hparams_seed, trial_seed))
    # Killed mid-write: no `done`, a partial last line, and accuracies that would top every table if used.
    perfect = ((0.99, 0.99),) * 3
    write_run(
        sweep / "algorithm=fishr,hparams_seed=2,test_envs=[0],trial_seed=0",
        [make_record("toy", "fishr", [0], 2, 0, 100, perfect)],
        done=False,
        tail='{"step": 200, "env0_in',
    )
    return sweep


def collect_output(capsys, *argv) -> tuple[int, str, str]:
    exit_code = collect.main([str(argument) for argument in argv])
    captured = capsys.readouterr()
    return exit_code, captured.out, captured.err


def section(markdown: str, heading: str) -> str:
    """The text of one `## ...` section."""
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


# ----------------------------------------------- the selection methods, one group at a time


def test_training_domain_validation_picks_best_checkpoint_then_best_hparams():
    group = toy_records("erm", 0, 0, 0) + toy_records("erm", 0, 1, 0)
    selected = model_selection.sweep_accuracy(group, TRAINING_DOMAIN_VALIDATION)
    assert selected.val_acc == pytest.approx(0.85) and selected.test_acc == pytest.approx(0.60)


def test_oracle_uses_the_last_checkpoint_and_the_test_domain_out_split():
    group = toy_records("erm", 0, 0, 0) + toy_records("erm", 0, 1, 0)
    selected = model_selection.sweep_accuracy(group, TEST_DOMAIN_VALIDATION)
    assert selected.val_acc == pytest.approx(0.68) and selected.test_acc == pytest.approx(0.66)


def test_ties_break_as_in_domainbed():
    # Checkpoints tied within a run: the first one. Hparams tied: the largest hparams_seed.
    within_run = model_selection.training_domain_validation_accuracy(toy_records("fishr", 0, 0, 0))
    assert within_run.test_acc == pytest.approx(0.62)
    across_hparams = toy_records("fishr", 0, 0, 1) + toy_records("fishr", 0, 1, 1)
    assert model_selection.sweep_accuracy(across_hparams, TRAINING_DOMAIN_VALIDATION).test_acc == pytest.approx(0.64)


def test_hparams_option_lists_what_each_cell_selected(toy_sweep, capsys):
    """`--hparams`: the hparams_seed the method picked per cell (ties as the tables: the largest seed) and its
    hyperparameters; the same seeds sweep_accuracy selects."""
    records = [
        json.loads(line)
        for path in sorted(toy_sweep.glob("*/results.jsonl"))
        for line in path.read_text().splitlines()
        if line.endswith("}") and (path.parent / "done").exists()
    ]
    group = toy_records("fishr", 0, 0, 1) + toy_records("fishr", 0, 1, 1)
    assert model_selection.best_hparams_seed(group, TRAINING_DOMAIN_VALIDATION)[0] == 1  # tied: the larger seed
    exit_code, out, _ = collect_output(capsys, toy_sweep, "--hparams")
    assert exit_code == 0
    training = section(out, "## Model selection: training-domain validation set")
    assert "### Selected hyperparameters, model selection method: training-domain validation set" in training
    assert "| toy | fishr | 0 | 1 | 1 | batch_size=32, lr=5e-05 |" in training
    rows = collect.selected_hparams_rows(records, TRAINING_DOMAIN_VALIDATION)
    assert len(rows) == len({tuple(row[:4]) for row in rows}) == 8  # one per (dataset, algorithm, test domain, trial)
    assert all("| " + " | ".join(row) + " |" in training for row in rows)
    _, without, _ = collect_output(capsys, toy_sweep)
    assert "Selected hyperparameters" not in without


def test_mean_and_standard_error_use_the_population_deviation():
    result = model_selection.mean_and_standard_error([0.60, 0.75])
    assert result.mean == pytest.approx(0.675)
    assert result.standard_error == pytest.approx(0.075 / 2**0.5)
    assert model_selection.mean_and_standard_error([]) is None


def test_records_with_two_test_domains_join_both_groups():
    record = make_record("toy", "erm", [0, 2], 0, 1, 100, ((0.5, 0.5),) * 3)
    groups = model_selection.group_records_by_test_domain([record])
    assert set(groups) == {GroupKey(1, "toy", "erm", 0), GroupKey(1, "toy", "erm", 2)}


# ----------------------------------------------- fishr-collect on our sweep layout


def test_collect_prints_training_domain_and_oracle_tables(toy_sweep, capsys):
    exit_code, out, _ = collect_output(capsys, toy_sweep)
    assert exit_code == 0
    assert "Complete runs: 12 (20 records)." in out
    training = section(out, "## Model selection: training-domain validation set")
    assert "### Dataset: toy, model selection method: training-domain validation set" in training
    assert "\n".join(TOY_TRAINING_DOMAIN_TABLE) in training
    assert "| Algorithm | toy | Avg |" in training
    for row in TOY_TRAINING_DOMAIN_AVERAGES:
        assert row in training
    oracle = section(out, "## Model selection: test-domain validation set (oracle)")
    for row in TOY_ORACLE_TABLE + TOY_ORACLE_AVERAGES:
        assert row in oracle
    leave_one_out = section(out, "## Model selection: leave-one-domain-out cross-validation")
    assert "no results" in leave_one_out and "test_envs=[t,v]" in leave_one_out
    # DomainBed's order of methods.
    assert out.index("training-domain validation set") < out.index("leave-one-domain-out") < out.index("(oracle)")


def test_incomplete_runs_are_reported_and_not_used(toy_sweep, capsys):
    _, out, _ = collect_output(capsys, toy_sweep)
    assert "Incomplete runs (no 'done' marker; not used): 1" in out
    assert "- algorithm=fishr,hparams_seed=2,test_envs=[0],trial_seed=0: 1 checkpoints, last step 100" in out
    assert "99.0" not in out  # the incomplete run's perfect accuracies are in no table


def test_latex_output(toy_sweep, capsys, tmp_path):
    output = tmp_path / "tables" / "results.tex"
    exit_code, out, _ = collect_output(capsys, toy_sweep, "--format", "latex", "--output", output)
    assert exit_code == 0 and f"wrote {output}" in out
    latex = output.read_text()
    assert latex.startswith("\\documentclass{article}") and latex.rstrip().endswith("\\end{document}")
    assert "\\subsection{Model selection: training-domain validation set}" in latex
    assert "\\textbf{Algorithm} & \\textbf{env0} & \\textbf{env1} & \\textbf{env2} & \\textbf{Avg} \\\\" in latex
    assert "erm & 67.5 $\\pm$ 5.3 & 55.0 $\\pm$ 3.5 & 40.0 $\\pm$ 0.0 & 54.2 \\\\" in latex
    assert "fishr & 67.0 $\\pm$ 0.7 & X & X & X \\\\" in latex
    assert "% Incomplete run (not used): algorithm=fishr,hparams\\_seed" not in latex  # comments are not escaped
    assert "% Incomplete run (not used): algorithm=fishr,hparams_seed=2" in latex
    assert latex.count("\\begin{tabular}") == 4  # (toy + averages) x (training-domain, oracle)


# ----------------------------------------------- DomainBed's own sweep layout and records

# ColoredMNIST, 3 domains; runs with test_envs [0] plus [0, 1] and [0, 2] for leave-one-domain-out.
# Per (trial, hparams): step -> (test run's env0 in, env0 out, env1/env2 out; [0,1] run's env1 in; [0,2] run's env2 in)
DOMAINBED_RUNS = {
    (0, 0): {100: (0.30, 0.31, 0.60, 0.60, 0.80), 200: (0.35, 0.36, 0.70, 0.70, 0.80)},  # LOO val .70, .75
    (0, 1): {100: (0.40, 0.41, 0.80, 0.90, 0.70), 200: (0.45, 0.46, 0.65, 0.60, 0.60)},  # LOO val .80 -> .40
    (1, 0): {100: (0.20, 0.21, 0.50, 0.50, 0.50), 200: (0.25, 0.26, 0.90, 0.90, 0.90)},  # LOO val .90 -> .25
    (1, 1): {100: (0.50, 0.51, 0.60, 0.60, 0.60), 200: (0.55, 0.56, 0.70, 0.70, 0.70)},  # LOO val .70
}
# Leave-one-domain-out: [.40, .25] -> 32.5 ± 0.075/sqrt(2) = 5.3
# Training-domain:      t0: hp0 best .70 (test .35), hp1 best .80 (test .40) -> .40; t1: .90 (.25) vs .70 -> .25
#                       -> 32.5 ± 5.3
# Oracle (last step):   t0: out .36 vs .46 -> .45; t1: out .26 vs .56 -> .55 -> 50.0 ± 0.05/sqrt(2) = 3.5


def domainbed_record(test_envs, hparams_seed, trial_seed, step, accuracies) -> dict:
    # The keys DomainBed's train.py writes besides the accuracies; fishr-collect must ignore them.
    record = make_record(
        "ColoredMNIST",
        "ERM",
        test_envs,
        hparams_seed,
        trial_seed,
        step,
        accuracies,
        loss=0.6,
        mem_gb=1.2,
        step_time=0.01,
    )
    record["args"].update(
        {
            "checkpoint_freq": None,
            "data_dir": "/data",
            "holdout_fraction": 0.2,
            "hparams": None,
            "output_dir": "/sweep/x",
            "save_model_every_checkpoint": False,
            "seed": 0,
            "skip_model_save": False,
            "steps": None,
            "task": "domain_generalization",
            "uda_holdout_fraction": 0,
        }
    )
    return record


@pytest.fixture
def domainbed_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "domainbed_sweep"
    run_number = 0
    for (trial_seed, hparams_seed), checkpoints in DOMAINBED_RUNS.items():
        runs = {(0,): [], (0, 1): [], (0, 2): []}
        for step, (test_in, test_out, env1_out, env1_in_loo, env2_in_loo) in checkpoints.items():
            runs[(0,)].append(
                domainbed_record(
                    [0], hparams_seed, trial_seed, step, ((test_in, test_out), (0.9, env1_out), (0.9, env1_out))
                )
            )
            runs[(0, 1)].append(
                domainbed_record([0, 1], hparams_seed, trial_seed, step, ((0.1, 0.1), (env1_in_loo, 0.2), (0.9, 0.9)))
            )
            runs[(0, 2)].append(
                domainbed_record([0, 2], hparams_seed, trial_seed, step, ((0.1, 0.1), (0.9, 0.9), (env2_in_loo, 0.2)))
            )
        for records in runs.values():
            # DomainBed names run directories by an md5 of their arguments.
            write_run(sweep / f"{run_number:032x}", records)
            run_number += 1
    return sweep


def test_collect_reads_domainbed_sweeps_with_all_three_methods(domainbed_sweep, capsys):
    exit_code, out, _ = collect_output(capsys, domainbed_sweep)
    assert exit_code == 0
    assert "Complete runs: 12 (24 records)." in out
    header = "| Algorithm | +90% | +80% | -90% | Avg |"
    training = section(out, "## Model selection: training-domain validation set")
    assert header in training and "| ERM | 32.5 ± 5.3 | X | X | X |" in training
    leave_one_out = section(out, "## Model selection: leave-one-domain-out cross-validation")
    assert header in leave_one_out and "| ERM | 32.5 ± 5.3 | X | X | X |" in leave_one_out
    oracle = section(out, "## Model selection: test-domain validation set (oracle)")
    assert "| ERM | 50.0 ± 3.5 | X | X | X |" in oracle


def test_leave_one_domain_out_validates_on_the_held_out_domains_in_split(domainbed_sweep):
    records = collect.load_sweep(domainbed_sweep).records
    selected = model_selection.selected_accuracies(records, LEAVE_ONE_DOMAIN_OUT)
    assert selected == {
        GroupKey(0, "ColoredMNIST", "ERM", 0): pytest.approx(0.40),
        GroupKey(1, "ColoredMNIST", "ERM", 0): pytest.approx(0.25),
    }


def test_latex_escapes_domain_names(domainbed_sweep, capsys):
    _, out, _ = collect_output(capsys, domainbed_sweep, "--format", "latex")
    assert "\\textbf{+90\\%} & \\textbf{+80\\%} & \\textbf{-90\\%}" in out
    assert "\\subsubsection{ColoredMNIST}" in out


# ----------------------------------------------- bad input: one paragraph, no traceback


def test_missing_and_empty_sweep_directories(tmp_path, capsys):
    exit_code, _, err = collect_output(capsys, tmp_path / "nope")
    assert exit_code == 2 and "is not a directory" in err and "Traceback" not in err
    exit_code, _, err = collect_output(capsys, tmp_path)
    assert exit_code == 2 and "No results.jsonl under" in err and "+sweep=domainbed" in err


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "sweep" / "run0", toy_records("erm", 1, 0, 0), tail="{not json\n")
    exit_code, _, err = collect_output(capsys, tmp_path / "sweep")
    assert exit_code == 2
    assert f"{run / 'results.jsonl'}:2: not valid JSON" in err


def test_record_without_args_names_what_is_missing(tmp_path, capsys):
    record = toy_records("erm", 1, 0, 0)[0]
    del record["args"]["trial_seed"]
    run = write_run(tmp_path / "sweep" / "run0", [record])
    exit_code, _, err = collect_output(capsys, tmp_path / "sweep")
    assert exit_code == 2 and f"{run / 'results.jsonl'}:1: 'args' has no 'trial_seed'" in err


def test_only_incomplete_runs(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "run0", toy_records("erm", 1, 0, 0), done=False)
    exit_code, out, err = collect_output(capsys, tmp_path / "sweep")
    assert exit_code == 1 and out == ""
    assert "none of the 1 runs" in err and "run0: 1 checkpoints, last step 200" in err


def test_undecodable_bytes_name_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "sweep" / "run0", toy_records("erm", 1, 0, 0))
    with (run / "results.jsonl").open("ab") as results_file:
        results_file.write(b"\xff\xfe\n")  # not UTF-8
    exit_code, _, err = collect_output(capsys, tmp_path / "sweep")
    assert exit_code == 2 and f"{run / 'results.jsonl'}:2: not valid JSON" in err and "Traceback" not in err


def test_seeds_that_are_not_integers_are_refused(tmp_path, capsys):
    record = toy_records("erm", 1, 0, 0)[0]
    record["args"]["trial_seed"] = "0"
    run = write_run(tmp_path / "sweep" / "run0", [record])
    exit_code, _, err = collect_output(capsys, tmp_path / "sweep")
    assert exit_code == 2 and f"{run / 'results.jsonl'}:1: 'args.trial_seed' must be an integer, found '0'" in err


# ----------------------------------------------- experiments the app adds to DomainBed's cell keys (issue 25)


def app_record(algorithm, hparams_seed, step, accuracies, backbone, **args) -> dict:
    """A record as the app writes it: DomainBed's sweep seed, its own output_dir, and the app's arguments."""
    from fishr_lightning.app.seeding import domainbed_sweep_seed

    record = make_record("toy", algorithm, [0], hparams_seed, 0, step, accuracies)
    record["hparams"]["resnet18"] = backbone == "resnet18"  # follows the backbone: no axis of its own
    record["args"].update(
        seed=domainbed_sweep_seed("toy", algorithm, [0], hparams_seed, 0),
        output_dir=f"/sweep/{algorithm},{backbone},{hparams_seed}",
        world_size=1 + hparams_seed,  # does not change results: never a row of its own
        backbone=backbone,
        steps=200,
        **args,
    )
    return record


def test_runs_of_two_backbones_are_not_pooled_into_one_cell(tmp_path, capsys):
    """A sweep over backbone=resnet18,resnet50 in one tree: each backbone is its own row; pooled, training-domain
    validation would have picked resnet18's hparams_seed 0 (val .80) for ERM's one cell, test .40."""
    sweep = tmp_path / "sweep"
    runs = {
        ("ERM", 0, "resnet18"): ((0.40, 0.40), (0.9, 0.80), (0.9, 0.80)),  # val .80
        ("ERM", 1, "resnet18"): ((0.45, 0.40), (0.9, 0.70), (0.9, 0.70)),  # val .70
        ("ERM", 0, "resnet50"): ((0.60, 0.40), (0.9, 0.60), (0.9, 0.60)),  # val .60
        ("ERM", 1, "resnet50"): ((0.70, 0.40), (0.9, 0.50), (0.9, 0.50)),  # val .50
        ("Fishr", 0, "resnet50"): ((0.65, 0.40), (0.9, 0.60), (0.9, 0.60)),
    }
    for (algorithm, hparams_seed, backbone), accuracies in runs.items():
        record = app_record(algorithm, hparams_seed, 100, accuracies, backbone)
        write_run(sweep / f"{algorithm},{hparams_seed},{backbone}", [record])
    exit_code, out, _ = collect_output(capsys, sweep)
    assert exit_code == 0
    assert "- toy: runs of one algorithm differ in backbone; each setting is its own row." in out
    training = section(out, "## Model selection: training-domain validation set")
    assert "| ERM [backbone=resnet18] | 40.0 ± 0.0 | X | X | X |" in training
    assert "| ERM [backbone=resnet50] | 60.0 ± 0.0 | X | X | X |" in training
    assert "| Fishr [backbone=resnet50] | 65.0 ± 0.0 | X | X | X |" in training
    assert "| ERM |" not in out


def test_every_recorded_argument_is_keyed_unless_it_does_not_change_results():
    from fishr_lightning.app.reporting.records import ARGS_THAT_DO_NOT_CHANGE_RESULTS

    accuracies = ((0.5, 0.5),) * 3
    plain = app_record("ERM", 0, 100, accuracies, "resnet50", data_pipeline="fast")
    assert collect.experiment_arguments(plain) == {
        "backbone": '"resnet50"',
        "data_pipeline": '"fast"',
        "protocol": '"classic"',  # recorded before issue 27, or DomainBed's without resnet50_augmix: the classic
        "seed": '"domainbed"',  # DomainBed's sweep seed of the cell: different for every run by construction
        "steps": "200",
    }
    assert "world_size" in ARGS_THAT_DO_NOT_CHANGE_RESULTS and "output_dir" in ARGS_THAT_DO_NOT_CHANGE_RESULTS
    # An argument added later (say data_finish) is keyed without being listed anywhere; another seed is an axis.
    later = app_record("ERM", 1, 100, accuracies, "resnet50", data_pipeline="fast", data_finish="device")
    other_seed = app_record("ERM", 0, 100, accuracies, "resnet50", data_pipeline="fast")
    other_seed["args"]["seed"] = 7
    assert collect.differing_arguments([plain, later, other_seed]) == {"toy": ["data_finish", "seed"]}
    # The same hparams_seed draws the same hyperparameters: two values of one (+hparams.lr=...) are two experiments.
    by_hand = app_record("ERM", 0, 100, accuracies, "resnet50", data_pipeline="fast")
    by_hand["hparams"]["lr"] = 1e-3
    assert collect.differing_arguments([plain, by_hand, later]) == {"toy": ["data_finish", "hparams.lr"]}


def test_a_shared_init_per_test_domain_is_no_axis_but_two_inits_for_one_test_domain_are():
    """DiWA's sweeps start each test domain's runs from that domain's own init (issue 29): other init files across
    test domains are the protocol, not two experiments; two inits for the same test domains are."""
    from fishr_lightning.app.seeding import domainbed_sweep_seed

    def run(hparams_seed: int, test_envs: list[int], init: str) -> dict:
        record = app_record("ERM", hparams_seed, 100, ((0.5, 0.5),) * 3, "resnet50")
        seed = domainbed_sweep_seed("toy", "ERM", test_envs, hparams_seed, 0)
        record["args"].update(test_envs=test_envs, seed=seed, init_from=f"/inits/{init}/init.pt", init_sha256=init * 8)
        return record

    one_init_per_test_domain = [run(0, [0], "a"), run(1, [0], "a"), run(0, [1], "b"), run(1, [1], "b")]
    assert collect.differing_arguments(one_init_per_test_domain) == {}
    two_inits_for_test_domain_0 = [*one_init_per_test_domain, run(2, [0], "c")]
    assert collect.differing_arguments(two_inits_for_test_domain_0) == {"toy": ["init_from", "init_sha256"]}


def test_rows_follow_domainbeds_algorithms_order_and_the_paper_layout_is_table_3(tmp_path, capsys):
    # One run per (dataset, algorithm), test domain 0 of 2; accuracies chosen so each cell is its test in-acc.
    sweep = tmp_path / "paper"
    accuracy = {"Fishr": 0.70, "ANDMask": 0.60, "ERM": 0.50, "SD": 0.55}
    for dataset in ("PACS", "ColoredMNIST"):
        for algorithm, test_in in accuracy.items():
            record = make_record(dataset, algorithm, [0], 0, 0, 100, ((test_in, test_in), (0.9, 0.8)))
            write_run(sweep / f"{dataset}_{algorithm}", [record])
    _, out, _ = collect_output(capsys, sweep)
    averages = section(out, "## Model selection: training-domain validation set")
    # DomainBed's ALGORITHMS order: ERM, ..., SD, ANDMask, ..., Fishr; datasets in its DATASETS order.
    rows = [line.split(" | ")[0] for line in averages.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[-5:] == ["| Algorithm", "| ERM", "| SD", "| ANDMask", "| Fishr"]
    assert "| Algorithm | ColoredMNIST | PACS | Avg |" in averages

    _, paper, _ = collect_output(capsys, sweep, "--layout", "paper")
    # The paper's Table 3: averages only, training-domain and oracle selection, its rows and labels (SD is not a
    # row of the paper: after its rows), its columns in its order, then Avg.
    assert "Dataset:" not in paper and "leave-one-domain-out" not in paper
    assert paper.count("### Table 3 layout (Rame et al. 2022)") == 2
    training = section(paper, "## Model selection: training-domain validation set")
    assert "| Algorithm | ColoredMNIST | PACS | Avg |" in training
    assert [line.split(" | ")[0] for line in training.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| Algorithm", "| ERM", "| AND-mask", "| Fishr", "| SD"
    ]  # fmt: skip
    assert "| AND-mask | 60.0 ± 0.0 | 60.0 ± 0.0 | 60.0 |" in training
