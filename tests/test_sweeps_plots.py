"""`fishr-collect --plots DIR`: one PNG per run and one per (dataset, selection method) table."""

from __future__ import annotations

from pathlib import Path

from test_sweeps_collect import TOY_RUNS, make_record, toy_records, write_run

from fishr_lightning.app.reporting import collect, plots
from fishr_lightning.app.reporting.model_selection import MeanAndError, ResultsTable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def test_collect_writes_a_plot_per_run_and_per_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for algorithm, test_env, hparams_seed, trial_seed in TOY_RUNS:
        write_run(
            sweep / algorithm / f"te{test_env}_hp{hparams_seed}_tr{trial_seed}",
            toy_records(algorithm, test_env, hparams_seed, trial_seed),
        )
    write_run(
        sweep / "fishr" / "unfinished", [make_record("toy", "fishr", [0], 5, 0, 100, ((0.5, 0.5),) * 3)], done=False
    )

    assert collect.main([str(sweep), "--plots", str(tmp_path / "plots")]) == 0
    assert f"wrote 15 plots under {tmp_path / 'plots'}" in capsys.readouterr().out

    run_plots = sorted(path.name for path in (tmp_path / "plots" / "runs").iterdir())
    assert len(run_plots) == len(TOY_RUNS) + 1  # the incomplete run is plotted too (titled so)
    assert "erm__te0_hp0_tr0.png" in run_plots and "fishr__unfinished.png" in run_plots
    table_plots = sorted(path.name for path in (tmp_path / "plots").glob("*.png"))
    # Training-domain and oracle tables; leave-one-domain-out has no runs here, so no plot.
    assert table_plots == ["toy_test_domain_oracle.png", "toy_training_domain.png"]
    assert all(is_png(path) for path in (tmp_path / "plots").rglob("*.png"))


def test_plot_run_without_penalty_and_table_with_missing_cells(tmp_path):
    erm_records = [make_record("toy", "erm", [1], 0, 0, step, ((0.8, 0.7), (0.4, 0.3))) for step in (0, 50, 100)]
    assert is_png(plots.plot_run(erm_records, tmp_path / "erm.png", title="erm"))

    table = ResultsTable(
        "Dataset: toy",
        ["A", "B"],
        ["ERM", "Fishr"],
        {"ERM": [MeanAndError(0.7, 0.01, 3), None], "Fishr": [MeanAndError(0.72, 0.02, 3), MeanAndError(0.5, 0.0, 1)]},
        dataset="toy",
    )
    assert is_png(plots.plot_results_table(table, tmp_path / "nested" / "table.png"))
