"""`averaging=swad|ema` in the app: DomainBed's records stay those of the plain run, the averaged
model is recorded beside them (averaged.jsonl) and fishr-collect shows it as its own rows."""

from __future__ import annotations

import json

import pytest
from test_app_train import SMALL_SYNTHETIC, records, run_app

from fishr_lightning.app.reporting import collect

SHORT = [*SMALL_SYNTHETIC, "steps=41", "checkpoint_freq=20", "+hparams.penalty_anneal_iters=5"]
SWAD = ["averaging=swad", "averaging.eval_every=5"]


def averaged(run_dir):
    return json.loads((run_dir / "averaged.jsonl").read_text())


def test_swad_leaves_domainbeds_records_as_they_are_and_records_the_averaged_model_beside(monkeypatch, tmp_path):
    assert run_app(monkeypatch, tmp_path / "plain", *SHORT) == 0
    assert run_app(monkeypatch, tmp_path / "swad", *SWAD, *SHORT) == 0
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("args", "step_time", "eval_time", "mem_gb")} for r in rs
    ]  # noqa: E731
    assert strip(records(tmp_path / "swad")) == strip(records(tmp_path / "plain"))
    record = averaged(tmp_path / "swad")
    assert record["args"]["algorithm"] == "Fishr + SWAD" and record["averaging"] == "SWAD"
    assert record["step"] == 40 and {f"env{e}_{s}_acc" for e in range(3) for s in ("in", "out")} <= set(record)
    summary = record["swad"]
    assert summary["num_segments"] == 9  # DomainBed steps 0, 5, ..., 40
    assert 1 <= summary["start_step"] <= summary["end_step"] <= 41 and summary["status"]
    assert (tmp_path / "swad" / "done").exists() and not (tmp_path / "plain" / "averaged.jsonl").exists()


def test_ema_is_recorded_beside_too(monkeypatch, tmp_path):
    assert run_app(monkeypatch, tmp_path / "ema", "averaging=ema", "algorithm=erm", *SHORT) == 0
    assert averaged(tmp_path / "ema")["args"]["algorithm"] == "ERM + EMA"


def test_fishr_collect_shows_averaged_runs_as_their_own_rows(monkeypatch, tmp_path, capsys):
    for algorithm in ("erm", "fishr"):
        for averaging in ("none", "swad"):
            run_dir = tmp_path / "sweep" / f"{algorithm}_{averaging}"
            averaging_options = SWAD if averaging == "swad" else []
            assert run_app(monkeypatch, run_dir, f"algorithm={algorithm}", *averaging_options, *SHORT) == 0
    capsys.readouterr()
    assert collect.main([str(tmp_path / "sweep"), "--plots", str(tmp_path / "plots")]) == 0
    tables = capsys.readouterr().out
    for method in ("training-domain validation set", "test-domain validation set (oracle)"):
        section = tables.split(f"## Model selection: {method}")[1].split("## Model selection")[0]
        for row in ("ERM", "Fishr", "ERM + SWAD", "Fishr + SWAD"):
            assert f"\n| {row} | " in section, (row, section)
    assert (
        len(list((tmp_path / "plots" / "runs").glob("*.png"))) == 4
    )  # one per run, averaged ones in the tables' plots


def test_a_swad_run_too_short_for_the_valley_is_an_error(monkeypatch, tmp_path, capsys):
    status = run_app(monkeypatch, tmp_path / "run", "averaging=swad", *SMALL_SYNTHETIC, "steps=10", "checkpoint_freq=5")
    assert status == 2
    assert "fewer than the n_converge=3 evaluations" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, every, ratio", [("vlcs", 50, 0.2), ("domain_net", 500, 0.3), ("pacs", 100, 0.3)])
def test_swads_per_dataset_settings(dataset, every, ratio):
    from hydra import compose, initialize_config_module

    with initialize_config_module("fishr_lightning.app.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={dataset}", "averaging=swad"])
    assert (cfg.averaging.eval_every, cfg.averaging.tolerance_ratio) == (every, ratio)
    assert cfg.steps == (15001 if dataset == "domain_net" else 5001)
