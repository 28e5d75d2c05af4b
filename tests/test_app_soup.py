"""``fishr-soup`` (issue 29): DiWA's uniform and greedy weight soups over a tiny sweep of runs that share
their initialisation, read back by ``fishr-collect``; groups that share no init or backbone are refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from fishr_lightning.app.reporting import collect
from fishr_lightning.app.training.run import load_model
from fishr_lightning.app.training.run import main as train_main
from fishr_lightning.app.training.soup import Member, WeightSum, greedy_selection, soup_sweep

FAST = ["trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=csv"]
# One seed for every member: the same seed-0 module initialisation (run.py seeds before building the module),
# other hyperparameters (hparams_seed's random-search draw): a sweep fine-tuned from one init, as DiWA's.
MEMBER_OPTIONS = [
    "algorithm=erm",
    "dataset.samples_per_domain=120",
    "batch_size=8",
    "steps=3",
    "checkpoint_freq=2",
    "seed=0",
    "trial_seed=0",
    "progress.every=0",
    "loader.num_workers=0",
]
HPARAMS_SEEDS = (0, 1, 2)


def run_app(run_dir: Path, *overrides: str) -> None:
    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["fishr-train", *FAST, f"hydra.run.dir={run_dir}", *overrides])
        try:
            train_main()
        except SystemExit as exit_:
            assert not exit_.code, f"the member run {run_dir} failed"
        finally:
            GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Three finished ERM runs from one seed-0 init, each with ``model_best.pt`` and a recorded init."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    init_dir = tmp_path_factory.mktemp("init")
    run_app(init_dir, *MEMBER_OPTIONS, "init=random")  # the shared initialisation: init.pt, no training
    for hparams_seed in HPARAMS_SEEDS:
        run_app(
            sweep_dir / f"run{hparams_seed}",
            *MEMBER_OPTIONS,
            f"hparams_seed={hparams_seed}",
            f"init_from={init_dir / 'init.pt'}",
            "save_model=best",
        )
    return sweep_dir


@pytest.fixture(scope="module")
def souped(sweep) -> tuple[Path, int]:
    return sweep, soup_sweep(sweep, device="cpu", bn_batches=2)


def soup_records(sweep_dir: Path) -> dict[str, dict]:
    return {
        path.parent.name.rsplit("-", 1)[-1]: json.loads(path.read_text())
        for path in sorted((sweep_dir / "diwa").glob("*/results.jsonl"))
    }


def test_the_uniform_soup_is_the_mean_of_the_members_best_weights(souped):
    sweep_dir, status = souped
    assert status == 0
    members = [torch.load(sweep_dir / f"run{seed}" / "model_best.pt", weights_only=True) for seed in HPARAMS_SEEDS]
    (uniform_dir,) = (sweep_dir / "diwa").glob("*-uniform")
    soup = torch.load(uniform_dir / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(
        load_model(uniform_dir / "model.pt").state_dict()["classifier.weight"], soup["classifier.weight"]
    )
    assert set(soup) == set(members[0]["state_dict"])
    for name, tensor in soup.items():
        expected = sum(member["state_dict"][name].double() for member in members) / len(members)
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=0, atol=1e-7)
    # The members really differ (other hyperparameters from one init): the average is not one of them.
    assert any(not torch.equal(members[0]["state_dict"][n], members[1]["state_dict"][n]) for n in soup)


def test_the_soups_records_are_runs_with_every_split(souped):
    sweep_dir, _ = souped
    records = soup_records(sweep_dir)
    assert set(records) == {"uniform", "restricted"}
    for selection, record in records.items():
        assert record["args"]["algorithm"] == f"ERM+DiWA({selection})"
        assert record["args"]["test_envs"] == [0] and record["args"]["trial_seed"] == 0
        assert "init_sha256" not in record["args"] and record["diwa"]["init_sha256"]
        assert all(0 <= record[f"env{env}_{split}_acc"] <= 1 for env in range(3) for split in ("in", "out"))
        assert (Path(record["args"]["output_dir"]) / "done").exists()
    restricted = records["restricted"]["diwa"]
    assert len(restricted["candidates"]) == len(HPARAMS_SEEDS)  # each candidate evaluated once
    assert restricted["candidates"][0]["accepted"]
    assert restricted["members"] == [c["run"] for c in restricted["candidates"] if c["accepted"]]
    val_accs = [c["val_acc"] for c in restricted["candidates"]]
    assert val_accs == sorted(val_accs, reverse=True)
    # The restricted soup's weights: the mean of the accepted members' best weights.
    kept = [torch.load(Path(run) / "model_best.pt", weights_only=True)["state_dict"] for run in restricted["members"]]
    soup = torch.load(Path(records["restricted"]["args"]["output_dir"]) / "model.pt", weights_only=True)["state_dict"]
    for name, tensor in soup.items():
        expected = sum(state[name].double() for state in kept) / len(kept)
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=0, atol=1e-7)


def test_the_weight_sum_averages_floating_tensors_in_float64_and_keeps_integer_buffers_from_the_first():
    total = WeightSum()
    for offset in (0, 1, 3):
        total.add({"w": torch.full((2,), 0.1 + offset), "num_batches_tracked": torch.tensor(5 + offset)}, Path("run"))
    mean = total.mean()
    assert mean["w"].dtype == torch.float32
    torch.testing.assert_close(mean["w"], torch.full((2,), 0.1 + 4 / 3))
    assert mean["num_batches_tracked"].item() == 5 and mean["num_batches_tracked"].dtype == torch.int64


def test_fishr_collect_tabulates_the_soups_beside_the_runs(souped, capsys):
    sweep_dir, _ = souped
    capsys.readouterr()
    assert collect.main([str(sweep_dir)]) == 0
    output = capsys.readouterr().out
    for name in ("ERM+DiWA(uniform)", "ERM+DiWA(restricted)"):
        assert f"| {name} " in output or f"{name} " in output
    assert "ERM [" not in output  # the soups' args label no row of the runs
    # A second fishr-soup does not take the soups for members.
    assert soup_sweep(sweep_dir, device="cpu", bn_batches=2) == 0
    assert len(list((sweep_dir / "diwa").iterdir())) == 2


def edited_copy(sweep: Path, tmp_path: Path, run: str, key: str, value) -> Path:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("diwa"))
    results = copy / run / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    for record in records:
        record["args"][key] = value
    results.write_text("".join(json.dumps(record) + "\n" for record in records))
    return copy


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("init_sha256", "0" * 64, "its runs start from 2 different initialisations"),
        ("init_sha256", None, "1 of its 3 runs (run1) record no shared initialisation"),
        ("backbone", "resnet18", "its runs use different backbones (mlp: 2 run(s), resnet18: 1 run(s))"),
    ],
)
def test_groups_without_a_shared_init_or_backbone_are_refused(sweep, tmp_path, capsys, key, value, reason):
    copy = edited_copy(sweep, tmp_path, "run1", key, value)
    capsys.readouterr()
    assert soup_sweep(copy, device="cpu") == 2  # nothing could be souped
    captured = capsys.readouterr()
    assert f"fishr-soup: refused Synthetic-ERM-test_envs0-trial0: {reason}" in captured.out
    assert "error: no group of runs could be souped" in captured.err
    assert not (copy / "diwa").exists()


def member(name: str, val_acc: float) -> Member:
    return Member(Path(name), {}, {}, val_acc)


def test_greedy_selection_adds_members_by_their_accuracy_while_the_soup_does_not_drop():
    members = [member("a", 0.70), member("b", 0.90), member("c", 0.80), member("d", 0.60), member("e", 0.80)]
    # The soup's accuracy, scripted per candidate set: c keeps it equal (accepted, DiWA's >=), e lowers it.
    scripted = {"b": 0.90, "bc": 0.90, "bce": 0.85, "bca": 0.93, "bcad": 0.92}
    calls = []

    def soup_accuracy(selected):
        key = "".join(str(m.directory) for m in selected)
        calls.append(key)
        return scripted[key]

    accepted, history = greedy_selection(members, soup_accuracy)
    assert calls == ["b", "bc", "bce", "bca", "bcad"]  # by decreasing accuracy, ties by name; each once
    assert [str(m.directory) for m in accepted] == ["b", "c", "a"]
    assert [line["accepted"] for line in history] == [True, True, False, True, False]
    assert [line["soup_val_acc"] for line in history] == [0.90, 0.90, 0.85, 0.93, 0.92]
