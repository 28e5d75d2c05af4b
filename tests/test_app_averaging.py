"""`averaging=swad|ema` in the app: DomainBed's records stay those of the plain run, the averaged
model is recorded beside them (averaged.jsonl) and fishr-collect shows it as its own rows."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from lightning.pytorch.strategies import Strategy
from test_app_train import SMALL_SYNTHETIC, assert_logged_accuracies, records, run_app
from torch import nn

from fishr_lightning.app.data.datamodule import DomainBatchSampler, DomainBedDataModule
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.reporting import collect
from fishr_lightning.app.training.averaging import AveragedModelRecord
from fishr_lightning.app.training.run import load_model

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
    # The loggers get both: the records' accuracies under acc/, the averaged model's under acc_swad/ (issue 30).
    assert_logged_accuracies(tmp_path / "swad", records(tmp_path / "swad"), "acc", 3, train_envs=[1, 2])
    assert_logged_accuracies(tmp_path / "swad", [record], "acc_swad", 3, train_envs=[1, 2])


def test_ema_is_recorded_beside_too(monkeypatch, tmp_path):
    assert run_app(monkeypatch, tmp_path / "ema", "averaging=ema", "algorithm=erm", *SHORT) == 0
    assert averaged(tmp_path / "ema")["args"]["algorithm"] == "ERM + EMA"
    assert_logged_accuracies(tmp_path / "ema", [averaged(tmp_path / "ema")], "acc_ema", 3, train_envs=[1, 2])


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


# -- BatchNorm statistics of the averaged weights (issue 18, item 1) ---------------------------------


class BatchNormMLP(nn.Module):
    """A backbone whose BatchNorm trains (DomainBed's resnet50_augmix has freeze_bn: false)."""

    def __init__(self, input_shape, width=16, **_mlp_options):
        super().__init__()
        self.n_outputs = width
        self.net = nn.Sequential(
            nn.Linear(input_shape[0], width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
        )

    def forward(self, x):
        return self.net(x)


BN_BATCHES = 4


def reference_batchnorm_statistics(module, steps_from):
    """The reference: the run's training draw for steps ``steps_from ..`` (DomainBatchSampler.batch_at,
    the app's 200-sample synthetic domains, test domain 0), the domains' x concatenated as in training;
    each BatchNorm's statistics the plain average over the batches of each batch's mean and unbiased
    variance of its input (khanrc/swad's update_bn: momentum None)."""
    data = load_domains("Synthetic", None, samples_per_domain=200, seed=0)
    datamodule = DomainBedDataModule(data, [0], 0.2, trial_seed=0, seed=0, batch_size=8, steps=41)
    dataset = datamodule.train_dataset()
    sampler = DomainBatchSampler([len(d) for d in dataset.datasets], batch_size=8, total_steps=0, seed=0)
    inputs = {}
    batchnorms = [m for m in module.modules() if isinstance(m, nn.BatchNorm1d)]
    hooks = [bn.register_forward_hook(lambda m, args, out: inputs[m].append(args[0])) for bn in batchnorms]
    for bn in batchnorms:
        inputs[bn] = []
    module.train()
    with torch.no_grad():
        for step in range(steps_from, steps_from + BN_BATCHES):
            module(torch.stack([dataset[i][0] for i in sampler.batch_at(step)]))
    for hook in hooks:
        hook.remove()
    return [
        (torch.stack([x.mean(0) for x in inputs[bn]]).mean(0), torch.stack([x.var(0) for x in inputs[bn]]).mean(0))
        for bn in batchnorms
    ]


@pytest.mark.parametrize("averaging", [SWAD, ["averaging=ema"]], ids=["swad", "ema"])
def test_trainable_batchnorm_of_the_averaged_model_is_recomputed_on_the_batches_after_the_last_step(
    monkeypatch, tmp_path, averaging
):
    run_dir = tmp_path / "run"
    overrides = [f"backbone._target_={__name__}.BatchNormMLP", f"averaging.bn_update_batches={BN_BATCHES}"]
    assert run_app(monkeypatch, run_dir, *averaging, *overrides, *SHORT) == 0
    module = load_model(run_dir / "model.pt")  # the averaged weights and their statistics
    expected = reference_batchnorm_statistics(copy.deepcopy(module), steps_from=41)  # the run ended at step 41
    for bn, (mean, var) in zip([m for m in module.modules() if isinstance(m, nn.BatchNorm1d)], expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # not the reset statistics
    record = averaged(run_dir)
    used = record["swad"]["batchnorm_batches"] if "swad" in record else record["batchnorm_batches"]
    assert used == BN_BATCHES


# -- the averaged evaluation: before teardown, on the training device (item 2) -----------------------


def spy_on_the_end_of_a_run(monkeypatch, tmp_path, *overrides):
    """Events in order: the device of the module's parameters at each training batch, at the averaged
    model's evaluation, and at Strategy.teardown (which moves the module to the CPU)."""
    events = []
    teardown, record = Strategy.teardown, AveragedModelRecord.on_train_end

    def spy_teardown(self):
        events.append(("teardown", next(self.lightning_module.parameters()).device))
        return teardown(self)

    def spy_record(self, trainer, pl_module):
        events.append(("averaged evaluation", next(pl_module.parameters()).device))
        record(self, trainer, pl_module)

    def spy_batch(self, trainer, pl_module, outputs, batch, batch_idx):
        events.append(("training", next(pl_module.parameters()).device))

    monkeypatch.setattr(Strategy, "teardown", spy_teardown)
    monkeypatch.setattr(AveragedModelRecord, "on_train_end", spy_record)
    monkeypatch.setattr(AveragedModelRecord, "on_train_batch_end", spy_batch, raising=False)
    assert run_app(monkeypatch, tmp_path / "run", *SWAD, *SHORT, *overrides) == 0
    assert (tmp_path / "run" / "averaged.jsonl").exists()
    return [name for name, _ in events], {name: device for name, device in events}


def test_the_averaged_model_is_evaluated_before_teardown_on_the_device_it_trained_on(monkeypatch, tmp_path):
    names, devices = spy_on_the_end_of_a_run(monkeypatch, tmp_path)
    assert names[-2:] == ["averaged evaluation", "teardown"] and set(names[:-2]) == {"training"}
    assert devices["averaged evaluation"] == devices["training"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: on the CPU no teardown moves the module")
def test_on_a_gpu_the_averaged_model_is_evaluated_on_the_gpu(monkeypatch, tmp_path):
    names, devices = spy_on_the_end_of_a_run(monkeypatch, tmp_path, "trainer=gpu")
    assert names[-2:] == ["averaged evaluation", "teardown"]
    assert devices["training"].type == devices["averaged evaluation"].type == "cuda"


# -- every precision end to end (item 3) ------------------------------------------------------------

PRECISIONS = ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
TINY = [*SMALL_SYNTHETIC, "steps=7", "checkpoint_freq=3", "averaging=swad", "averaging.eval_every=2"]


def run_at_precision(monkeypatch, tmp_path, precision, *overrides):
    run_dir = tmp_path / precision
    status = run_app(
        monkeypatch,
        run_dir,
        f"trainer.precision={precision}",
        "save_model=full",  # model.ckpt (raw weights, Fishr's state) and model.pt (the averaged weights)
        "+hparams.penalty_anneal_iters=2",
        *TINY,
        *overrides,
    )
    assert status == 0
    written = records(run_dir)
    assert [r["step"] for r in written] == [0, 3, 6]
    assert all(math.isfinite(r["penalty"]) and math.isfinite(r["loss"]) for r in written)
    record = averaged(run_dir)
    assert all(0.0 <= record[f"env{e}_{s}_acc"] <= 1.0 for e in range(3) for s in ("in", "out"))
    weights = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    fishr = next(
        state
        for state in torch.load(run_dir / "model.ckpt", weights_only=False)["callbacks"].values()
        if "penalty" in state
    )
    assert fishr["penalty"]["ema_state_EP"].dtype == torch.float32  # the core's statistics stay float32
    return written, record, weights


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_the_app_end_to_end(monkeypatch, tmp_path, precision):
    _, _, weights = run_at_precision(monkeypatch, tmp_path, precision)
    expected_dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16}.get(precision, torch.float32)
    assert weights["classifier.weight"].dtype == expected_dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA's float16 autocast and half kernels")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_the_app_end_to_end_on_a_gpu(monkeypatch, tmp_path, precision):
    run_at_precision(monkeypatch, tmp_path, precision, "trainer=gpu")


# -- save_model=full keeps the raw training state (item 6); the valley's transform (item 7) ---------


def test_save_model_full_with_swad_keeps_the_raw_weights_resumable_and_the_average_in_model_pt(monkeypatch, tmp_path):
    assert run_app(monkeypatch, tmp_path / "plain", "save_model=full", *SHORT) == 0
    assert run_app(monkeypatch, tmp_path / "swad", "save_model=full", *SWAD, *SHORT) == 0
    plain, swad = (torch.load(tmp_path / r / "model.ckpt", weights_only=False) for r in ("plain", "swad"))
    for name, raw in plain["state_dict"].items():  # the same trajectory: the raw weights, not the average
        torch.testing.assert_close(swad["state_dict"][name], raw, rtol=0, atol=0)
    for a, b in zip(plain["optimizer_states"][0]["state"].values(), swad["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    assert swad["global_step"] == 41
    averaged_weights = torch.load(tmp_path / "swad" / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(averaged_weights["classifier.weight"], swad["state_dict"]["classifier.weight"])


def test_swads_valley_loss_uses_the_plain_transform_by_default_and_the_switch_is_recorded(monkeypatch, tmp_path):
    asked = []
    eval_loader = DomainBedDataModule.eval_loader

    def spy(self, step, rank=0, world_size=1, splits=None, augmentation=None):
        asked.append((splits is not None, augmentation))
        return eval_loader(self, step, rank, world_size, splits, augmentation)

    monkeypatch.setattr(DomainBedDataModule, "eval_loader", spy)
    assert run_app(monkeypatch, tmp_path / "run", *SWAD, *SHORT) == 0
    assert {augmentation for valley, augmentation in asked if valley} == {False}  # the valley loss
    assert {augmentation for valley, augmentation in asked if not valley} == {None}  # DomainBed's (its own default)
    assert averaged(tmp_path / "run")["args"]["averaging"]["valley_augmentation"] is False
