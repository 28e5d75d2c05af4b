"""The training app end to end, in process (``fishr-train``'s ``main``): few-step runs write
DomainBed's records, resume continues the same run, finished runs are skipped, and bad input ends
with one paragraph and a non-zero exit status."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from data_factories import write_camelyon, write_mnist, write_pacs
from hydra.core.global_hydra import GlobalHydra

from fishr_lightning.app import AppError
from fishr_lightning.app.training.backbones import ResNetFeaturizer
from fishr_lightning.app.training.run import load_model, main
from fishr_lightning.schedule import PenaltyScheduleWarning

FAST = ["trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=csv"]
SMALL_SYNTHETIC = ["dataset.samples_per_domain=200", "batch_size=8"]


def run_app(monkeypatch, run_dir: Path, *overrides: str) -> int:
    """``fishr-train OVERRIDES hydra.run.dir=RUN_DIR``; its exit status."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["fishr-train", *FAST, f"hydra.run.dir={run_dir}", *overrides])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return 0


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def assert_domainbed_records(run_dir: Path, num_domains: int, steps: list[int], dataset: str, algorithm: str):
    written = records(run_dir)
    assert [r["step"] for r in written] == steps
    for record in written:
        for env in range(num_domains):
            assert 0.0 <= record[f"env{env}_in_acc"] <= 1.0 and 0.0 <= record[f"env{env}_out_acc"] <= 1.0
        assert record["loss"] > 0 and record["nll"] > 0 and record["epoch"] >= 0
        assert record["args"]["dataset"] == dataset and record["args"]["algorithm"] == algorithm
        assert {"test_envs", "hparams_seed", "trial_seed", "seed", "world_size", "eval_augmentation"} <= set(
            record["args"]
        )
        assert {"lr", "batch_size", "weight_decay", "resnet_dropout"} <= set(record["hparams"])
    assert (run_dir / "done").exists() and (run_dir / "model.pt").exists()
    assert not (run_dir / "model.ckpt").exists() and not (run_dir / "checkpoints").exists()


def logged_rows(run_dir: Path, column: str) -> dict[int, dict[str, float]]:
    """The CSV logger's rows that hold ``column``, by step: ``{step: {name: value}}`` (the row's non-empty cells)."""
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as metrics:
        rows = [row for row in csv.DictReader(metrics) if row.get(column)]
    by_step = {int(row["step"]): {name: float(value) for name, value in row.items() if value} for row in rows}
    assert len(by_step) == len(rows), f"{column} logged twice at a step"  # e.g. by every DDP process
    return by_step


def expected_accuracies(record: dict, section: str, num_domains: int, train_envs: list[int]) -> dict[str, float]:
    """A record's accuracies under the loggers' names (issue 30), from the record as DomainBed's reader sees
    it: every split, and the training-domain validation accuracy, the mean of the training domains' out splits."""
    expected = {f"{section}/env{e}_{s}": record[f"env{e}_{s}_acc"] for e in range(num_domains) for s in ("in", "out")}
    expected[f"{section}/val_training_domain"] = sum(record[f"env{e}_out_acc"] for e in train_envs) / len(train_envs)
    return expected


def assert_logged_accuracies(run_dir: Path, written: list[dict], section: str, num_domains: int, train_envs: list[int]):
    """metrics.csv holds each record's accuracies at the record's step, and no other accuracy row."""
    rows = logged_rows(run_dir, f"{section}/env0_in")
    assert sorted(rows) == [record["step"] for record in written]
    for record in written:
        expected = expected_accuracies(record, section, num_domains, train_envs)
        logged = {name: value for name, value in rows[record["step"]].items() if name.startswith(f"{section}/")}
        assert logged == pytest.approx(expected, rel=1e-12, abs=0), record["step"]


def test_synthetic_fishr_run_writes_domainbed_records_with_the_penalty(monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = run_app(
        monkeypatch,
        run_dir,
        "algorithm=fishr",
        *SMALL_SYNTHETIC,
        "steps=6",
        "checkpoint_freq=4",
        "+hparams.penalty_anneal_iters=2",
        "+hparams.lambda=10",
    )
    assert status == 0
    assert_domainbed_records(run_dir, 3, [0, 4, 5], "Synthetic", "Fishr")
    last = records(run_dir)[-1]
    assert last["penalty"] >= 0 and last["loss"] > last["nll"]  # λ·P is in the objective after warm-up
    assert last["hparams"]["lambda"] == 10 and last["hparams"]["batch_size"] == 8
    assert last["args"]["test_envs"] == [0]
    out = capsys.readouterr().out
    assert "0: -90%" in out and "test" in out and "train" in out  # the per-domain summary
    assert "Fishr: test-domain accuracy -90% " in out and "algorithm=erm" in out
    # The accuracies reach the Lightning logger too, at the records' steps (issue 30).
    assert_logged_accuracies(run_dir, records(run_dir), "acc", 3, train_envs=[1, 2])


@pytest.mark.parametrize(
    ("dataset", "name", "num_domains", "write", "holdout_fraction"),
    [
        ("pacs", "PACS", 4, lambda data_dir: write_pacs(data_dir, images_per_class=3, size=20), 0.2),
        # PNGs listed by WILDS' metadata, 2 or 3 per hospital: half of them out (issue 28)
        ("wilds_camelyon", "WILDSCamelyon", 5, write_camelyon, 0.5),
    ],
)
def test_pacs_image_folder_run_with_resnet18(
    monkeypatch, tmp_path, dataset, name, num_domains, write, holdout_fraction
):
    data_dir, run_dir = write(tmp_path / "data"), tmp_path / "run"
    status = run_app(
        monkeypatch,
        run_dir,
        f"dataset={dataset}",
        f"holdout_fraction={holdout_fraction}",
        "algorithm=erm",
        f"data_dir={data_dir}",
        "backbone=resnet18",
        "backbone.pretrained=false",
        "dataset.image_size=32",
        "batch_size=2",
        "steps=2",
        "checkpoint_freq=1",
        "loader.num_workers=0",
        "loader.eval_batch_size=32",
        "test_envs=[3]",
    )
    assert status == 0
    assert_domainbed_records(run_dir, num_domains, [0, 1], name, "ERM")
    assert records(run_dir)[-1]["args"]["test_envs"] == [3] and records(run_dir)[-1]["hparams"]["resnet18"] is True
    assert records(run_dir)[-1]["args"]["data_pipeline"] == "fast"  # the default (issue 20)


def test_colored_mnist_idx_files_run_with_mnist_cnn(monkeypatch, tmp_path):
    data_dir, run_dir = write_mnist(tmp_path / "data", n_train=90, n_test=30), tmp_path / "run"
    status = run_app(
        monkeypatch,
        run_dir,
        "dataset=colored_mnist",
        f"data_dir={data_dir}",
        "algorithm=fishr",
        "batch_size=4",
        "steps=2",
        "checkpoint_freq=2",
        "+hparams.penalty_anneal_iters=0",
    )
    assert status == 0
    assert_domainbed_records(run_dir, 3, [0, 1], "ColoredMNIST", "Fishr")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def accuracies(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.endswith("_acc")} for r in records(run_dir)]


def test_resume_after_a_failure_continues_the_same_run(monkeypatch, tmp_path):
    options = [
        "algorithm=fishr",
        *SMALL_SYNTHETIC,
        "steps=9",
        "checkpoint_freq=3",
        "+hparams.penalty_anneal_iters=2",
        "+hparams.lambda=10",
        "save_model=best",  # model_best.pt: the resumed run knows the best record before the interruption (issue 29)
    ]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert run_app(monkeypatch, uninterrupted, *options) == 0
    # Killed after 6 updates: records 0 and 3 written, the checkpoint of update 4 (after the record of 3) kept.
    killed = ["+callbacks.stop._target_=data_factories.InterruptAfter", "+callbacks.stop.updates=6"]
    assert run_app(monkeypatch, interrupted, *options, *killed) != 0
    assert not (interrupted / "done").exists() and (interrupted / "checkpoints" / "last.ckpt").exists()
    assert [r["step"] for r in records(interrupted)] == [0, 3]
    with (interrupted / "results.jsonl").open("a") as results_file:
        results_file.write('{"step": 5, "env0_in')  # killed while writing a record
    assert run_app(monkeypatch, interrupted, *options, "ckpt_path=last") == 0
    expected, resumed = final_weights(uninterrupted), final_weights(interrupted)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], msg=name)
    assert [r["step"] for r in records(interrupted)] == [0, 3, 6, 8]
    assert accuracies(interrupted) == accuracies(uninterrupted)
    assert (interrupted / "done").exists() and not (interrupted / "checkpoints").exists()
    best, resumed_best = (torch.load(d / "model_best.pt", weights_only=True) for d in (uninterrupted, interrupted))
    assert (resumed_best["step"], resumed_best["val_acc"]) == (best["step"], best["val_acc"])
    for name, tensor in best["state_dict"].items():
        torch.testing.assert_close(resumed_best["state_dict"][name], tensor, msg=name)


@pytest.mark.parametrize(
    ("steps", "checkpoint_freq", "labels"),
    [(10, 5, [0, 5, 9]), (6, 3, [0, 3, 5]), (7, 3, [0, 3, 6]), (1, 5, [0]), (4, 1, [0, 1, 2, 3]), (5, 10, [0, 4])],
)
def test_records_carry_domainbeds_step_labels(monkeypatch, tmp_path, steps, checkpoint_freq, labels):
    """DomainBed's train.py: ``for step in range(steps)``, one update, then a record when
    ``step % checkpoint_freq == 0 or step == steps - 1``, labelled ``step``: ``steps`` updates."""
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, f"steps={steps}", f"checkpoint_freq={checkpoint_freq}") == 0
    written = records(run_dir)
    assert [r["step"] for r in written] == labels
    assert written[-1]["epoch"] == pytest.approx(labels[-1] / (160 / 8))  # smallest in split / batch_size
    updates = torch.load(run_dir / "model.pt", weights_only=True)["step"] + 1
    assert updates == steps


def test_the_dataset_defaults_give_domainbeds_5001_updates():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fishr_lightning.app.configs", version_base="1.3"):
        domainbed_datasets = ("colored_mnist", "rotated_mnist", "vlcs", "pacs", "office_home", "terra_incognita")
        for dataset in (*domainbed_datasets, "domain_net"):
            cfg = compose("train", overrides=[f"dataset={dataset}"])
            assert cfg.steps == 5001, dataset


@pytest.mark.parametrize(("mode", "files"), [("weights", {"model.pt"}), ("full", {"model.ckpt"}), ("none", set())])
def test_save_model_keeps_one_copy_of_the_weights_or_none(monkeypatch, tmp_path, mode, files):
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=3", "checkpoint_freq=2", f"save_model={mode}") == 0
    kept = {path.name for path in run_dir.iterdir() if path.suffix in (".pt", ".ckpt", ".pkl")}
    assert kept == files and not (run_dir / "checkpoints").exists()
    assert records(run_dir)[-1]["args"]["save_model"] == mode


def test_model_pt_rebuilds_the_trained_module(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=3", "checkpoint_freq=2") == 0
    module = load_model(run_dir / "model.pt")
    from fishr_lightning.app.data.synthetic import synthetic_domains

    x, y = synthetic_domains(seed=0, samples_per_domain=200).domains[0].tensors
    with torch.no_grad():
        accuracy = (module(x).argmax(dim=1) == y).float().mean().item()
    # The records' env0 accuracy is over env0's in and out splits, which together are the whole domain.
    last = records(run_dir)[-1]
    expected = (last["env0_in_acc"] * 160 + last["env0_out_acc"] * 40) / 200
    assert accuracy == pytest.approx(expected, abs=1e-6)


def test_eval_augmentation_changes_only_the_training_domains_accuracies(monkeypatch, tmp_path):
    """A transform that changes predictions (the training augmentation of a random network) makes the
    training domains' accuracies differ between the two settings; the test domain's stays."""
    data_dir = write_pacs(tmp_path / "data", images_per_class=4, size=20)
    options = [
        "dataset=pacs",
        f"data_dir={data_dir}",
        "backbone=resnet18",
        "backbone.pretrained=false",
        "dataset.image_size=32",
        "batch_size=2",
        "steps=1",
        "loader.num_workers=0",
        "test_envs=[3]",
        # This random network's predictions move with DomainBed's PIL augmentation; the fast pipeline's
        # evaluation augmentation is tested on the tensors (test_app_data.py, both pipelines).
        "data.pipeline=domainbed",
    ]
    runs = {}
    for setting in ("true", "false"):
        run_dir = tmp_path / setting
        assert run_app(monkeypatch, run_dir, *options, f"eval_augmentation={setting}") == 0
        runs[setting] = records(run_dir)[-1]
        assert runs[setting]["args"]["eval_augmentation"] is (setting == "true")
    augmented, clean = runs["true"], runs["false"]
    assert augmented["env3_in_acc"] == clean["env3_in_acc"] and augmented["env3_out_acc"] == clean["env3_out_acc"]
    training_splits = [f"env{env}_{split}_acc" for env in (0, 1, 2) for split in ("in", "out")]
    assert [augmented[name] for name in training_splits] != [clean[name] for name in training_splits]


def test_a_finished_run_is_skipped(monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "checkpoint_freq=2") == 0
    # Fishr's warm-up on Synthetic (300) is past steps=2: said once, in the app's terms (issue 30), not also by
    # the callback in the Trainer's.
    (warmup,) = [str(w.message) for w in caught if issubclass(w.category, PenaltyScheduleWarning)]
    assert warmup == (
        "Fishr's warm-up, hparams.penalty_anneal_iters=300, is at or past the run's last step (steps=2: steps 0 to "
        "1): fishr/weight stays 0 instead of 1000 throughout, and none of the records (steps 0, 1) follows a step "
        "with the penalty at its weight. Train longer (steps=302 or more) or lower the warm-up "
        "(+hparams.penalty_anneal_iters=N below 1)."
    )
    before = (run_dir / "results.jsonl").read_text()
    capsys.readouterr()
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "checkpoint_freq=2") == 0
    assert "skipping" in capsys.readouterr().out
    assert (run_dir / "results.jsonl").read_text() == before


def test_extra_callbacks_from_the_callbacks_group_are_instantiated(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    assert (
        run_app(
            monkeypatch,
            run_dir,
            *SMALL_SYNTHETIC,
            "steps=2",
            "checkpoint_freq=2",
            "+callbacks=lr_monitor",
            "trainer.log_every_n_steps=1",
        )
        == 0
    )
    assert "lr-Adam" in (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    # Recorded, so that fishr-collect keys its cells on it (issue 25); extra callbacks are not (they do not change results).
    assert records(run_dir)[-1]["args"]["precision"] == "32-true" and "callbacks" not in records(run_dir)[-1]["args"]


def test_a_missing_data_directory_exits_with_the_layout_and_the_download_command(monkeypatch, tmp_path, capsys):
    status = run_app(monkeypatch, tmp_path / "run", "dataset=pacs", f"data_dir={tmp_path / 'nowhere'}")
    err = capsys.readouterr().err
    assert status != 0
    assert "fishr-download pacs --data-dir" in err and "art_painting" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1  # one paragraph


def test_malformed_mnist_files_exit_with_the_expected_layout(monkeypatch, tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"not an idx file")
    status = run_app(monkeypatch, tmp_path / "run", "dataset=rotated_mnist", f"data_dir={tmp_path / 'data'}")
    err = capsys.readouterr().err
    assert status != 0 and "fishr-download rotated_mnist" in err and "Traceback" not in err


def test_test_envs_out_of_range_exit_with_a_clear_error(monkeypatch, tmp_path, capsys):
    status = run_app(monkeypatch, tmp_path / "run", "test_envs=[5]")
    err = capsys.readouterr().err
    assert status != 0 and "test_envs=[5] is out of range" in err and "3 domains" in err


def test_an_unknown_option_shows_hydras_choices(monkeypatch, tmp_path, capsys):
    status = run_app(monkeypatch, tmp_path / "run", "algorithm=dan")  # a misspelt choice
    err = capsys.readouterr().err
    assert status != 0 and "Available options" in err and "erm" in err and "fishr" in err


def test_a_missing_checkpoint_is_refused_and_leaves_a_finished_run_finished(monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, "steps=2", "checkpoint_freq=2") == 0
    capsys.readouterr()
    status = run_app(monkeypatch, run_dir, *SMALL_SYNTHETIC, f"ckpt_path={tmp_path / 'none.ckpt'}")
    assert status != 0 and "is not a file" in capsys.readouterr().err
    assert (run_dir / "done").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("steps=0", "steps=0: it is a number of optimizer steps"),
        ("steps=-1", "steps=-1: it is a number of optimizer steps"),
        ("checkpoint_freq=0", "checkpoint_freq=0: it is a number of optimizer steps"),
        ("holdout_fraction=1.5", "holdout_fraction=1.5: it is the share of each domain held out"),
        ("batch_size=0", "batch_size=0: it is the number of samples per training domain"),
        ("+hparams.lamda=100", "hparams.lamda is not a hyperparameter of the registry; on Synthetic they are"),
        ("+hparams.class_balanced=true", "hparams.class_balanced=True is not supported: the app draws"),
        ("batch_size=abc", "batch_size=abc: it is the number of samples per training domain"),
        ("save_model=all", "save_model=all: choose weights"),
        ("progress.every=-1", "progress.every=-1: the steps between progress lines"),
    ],
)
def test_out_of_range_options_exit_with_one_line_and_no_run(monkeypatch, tmp_path, capsys, override, needle):
    status = run_app(monkeypatch, tmp_path / "run", override)
    err = capsys.readouterr().err
    assert status != 0 and needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_unreachable_pretrained_weights_name_the_two_ways_out(monkeypatch, tmp_path, capsys):
    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)
    with pytest.raises(AppError) as error:
        ResNetFeaturizer((3, 32, 32), depth=18, pretrained=True)
    assert "backbone.pretrained=false" in str(error.value) and "backbone.weights_path=" in str(error.value)
    # Through the app, Hydra's instantiate wraps it (`Error in call to target ...: AppError(...)`): it ends
    # as every other error does, one `error:` line (issue 30).
    assert run_app(monkeypatch, tmp_path / "run", *SMALL_SYNTHETIC, "backbone=resnet18") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error.value}") and len(err.strip().splitlines()) == 1, err


def test_local_weights_are_loaded_and_batchnorm_stays_frozen(tmp_path):
    source = ResNetFeaturizer((3, 32, 32), depth=18, pretrained=False)
    weights = {k: v for k, v in source.network.state_dict().items()}
    weights["fc.weight"], weights["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # torchvision's file has fc
    torch.save(weights, tmp_path / "resnet18.pth")
    loaded = ResNetFeaturizer((2, 32, 32), depth=18, weights_path=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(loaded.network.layer1[0].conv1.weight, source.network.layer1[0].conv1.weight)
    torch.testing.assert_close(loaded.network.conv1.weight[:, 1], source.network.conv1.weight[:, 1])  # 2 channels
    loaded.train()
    assert loaded.training and not loaded.network.bn1.training
    assert loaded(torch.randn(2, 2, 32, 32)).shape == (2, 512)


def test_gradient_accumulation_is_refused_with_what_to_do_instead(monkeypatch, tmp_path, capsys):
    """Issue 18: Lightning's micro-batches would split DomainBed's step (records at [0, 0, 2, 2, 4, 5],
    one Fishr penalty per micro-batch); the app says what gives a larger step instead."""
    status = run_app(monkeypatch, tmp_path / "run", *SMALL_SYNTHETIC, "steps=6", "+trainer.accumulate_grad_batches=2")
    assert status == 2
    err = capsys.readouterr().err
    assert "accumulate_grad_batches=2 is not supported" in err and "Raise batch_size" in err and "more devices" in err
    assert not (tmp_path / "run" / "results.jsonl").exists()
