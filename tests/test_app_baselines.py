"""The app's module runs DomainBed's Mixup (mixed inputs, one forward per pair with trainable
BatchNorm) and, for CORAL, MMD and GroupDRO, one forward per domain: trained weights equal
DomainBed's update() (tests/baselines_reference.py) on the same batches and draws."""

from __future__ import annotations

import copy

import baselines_reference as ref
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning.app.seeding import seed_hash
from fishr_lightning.app.training.evaluation import step_losses
from fishr_lightning.app.training.module import DomainClassifier

E, B, STEPS, LR = 3, 6, 4, 0.05


class TinyFeaturizer(nn.Sequential):
    def __init__(self, batchnorm: bool):
        # No bias before BatchNorm: its gradient is zero up to rounding, which Adam would amplify to lr-sized steps.
        super().__init__(nn.Linear(5, 8, bias=not batchnorm), *([nn.BatchNorm1d(8)] if batchnorm else []), nn.Tanh())
        self.n_outputs = 8


def app_module(batchnorm: bool, **options) -> DomainClassifier:
    torch.manual_seed(0)
    return DomainClassifier(TinyFeaturizer(batchnorm), num_classes=3, lr=LR, **options).double()


def domain_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The app's layout: each step's batch is one contiguous block of B samples per domain."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * E * B, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (steps * E * B,), generator=g)
    domains = torch.arange(E).repeat_interleave(B).repeat(steps)
    return x, y, domains


def loader():
    return DataLoader(TensorDataset(*domain_batches()), batch_size=E * B, shuffle=False)


def minibatches_of_each_step():
    x, y, _ = domain_batches()
    for step in range(STEPS):
        rows = slice(step * E * B, (step + 1) * E * B)
        yield [(xb, yb) for xb, yb in zip(x[rows].split(B), y[rows].split(B))]


class RecordedLosses(pl.Callback):
    """The loss terms the app records of each step (``step_losses``)."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(step_losses(outputs, trainer))


def fit(module, callbacks=()):
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, loader())
    return trainer


def assert_same_weights(module, algorithm):
    expected = nn.Sequential(algorithm.featurizer, algorithm.classifier).state_dict()
    actual = nn.Sequential(module.featurizer, module.classifier).state_dict()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["one_forward", "forward_per_pair"])
def test_mixup_equals_domainbeds_update(batchnorm):
    alpha = 0.4
    module = app_module(batchnorm, per_domain_forward=True, mixup_alpha=alpha, mixup_seed=3)
    algorithm = ref.DomainBedAlgorithm(
        "Mixup", copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier), {"mixup_alpha": alpha}, LR
    )
    returned = []
    for step, minibatches in enumerate(minibatches_of_each_step()):
        # The app's draws: each step's permutation and λ's from (mixup_seed, step) only.
        seed = seed_hash(3, step)
        perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed)).tolist()
        lams = np.random.RandomState(seed).beta(alpha, alpha, size=E)
        returned.append(algorithm.update(minibatches, lams=[float(lam) for lam in lams], perm=perm))
    recorded = RecordedLosses()
    fit(module, [recorded])
    assert_same_weights(module, algorithm)
    # The record's `loss` is DomainBed's Mixup objective, and Mixup has no penalty (issue 25).
    assert [values["loss"] for values in recorded.values] == pytest.approx([r["loss"] for r in returned], rel=1e-9)
    assert not any("penalty" in values for values in recorded.values)


@pytest.mark.parametrize("name", ["CORAL", "GroupDRO"])
def test_per_domain_forward_with_batchnorm_equals_domainbeds_update(name):
    """Each domain normalised by its own BatchNorm statistics, as DomainBed's per-domain forwards."""
    from fishr_lightning.baselines import CORALCallback, GroupDROCallback

    callback, hparams = {
        "CORAL": (CORALCallback(mmd_gamma=2.0, head="classifier"), {"mmd_gamma": 2.0}),
        "GroupDRO": (GroupDROCallback(groupdro_eta=0.5, head="classifier"), {"groupdro_eta": 0.5}),
    }[name]
    module = app_module(True, per_domain_forward=True)
    algorithm = ref.DomainBedAlgorithm(
        name, copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier), hparams, LR
    )
    for minibatches in minibatches_of_each_step():
        algorithm.update(minibatches)
    fit(module, [callback])
    assert_same_weights(module, algorithm)


def test_one_forward_per_domain_only_with_trainable_batchnorm():
    assert app_module(True, per_domain_forward=True).forwards_per_domain()
    assert not app_module(False, per_domain_forward=True).forwards_per_domain()
    assert not app_module(True).forwards_per_domain()
    frozen = app_module(True, per_domain_forward=True)
    frozen.featurizer[1].eval()
    assert not frozen.forwards_per_domain()


COMPARISON_SET = ("irm", "vrex", "coral", "mmd", "groupdro", "mixup", "sd")
NAMES = dict(zip(COMPARISON_SET, ("IRM", "VREx", "CORAL", "MMD", "GroupDRO", "Mixup", "SD")))
OWN_HPARAM = {"irm": "irm_lambda", "vrex": "vrex_lambda", "coral": "mmd_gamma", "mmd": "mmd_gamma"}
OWN_HPARAM |= {"groupdro": "groupdro_eta", "mixup": "mixup_alpha", "sd": "sd_reg"}


def test_every_algorithm_runs_in_the_app_and_collect_shows_it(tmp_path, capsys, monkeypatch):
    """One Hydra multirun, one tiny run per algorithm (a random-search draw), then fishr-collect --hparams.
    The multirun is the app's main() in this process: no new interpreter importing Lightning for it."""
    import json
    import sys
    from pathlib import Path

    from hydra.core.global_hydra import GlobalHydra

    from fishr_lightning.app.reporting import collect
    from fishr_lightning.app.training.hparams import hparams_for
    from fishr_lightning.app.training.run import main

    repository = Path(__file__).resolve().parents[1]
    sweep_dir = tmp_path / "sweep"
    command = [
        "train.py",
        "-m",
        "+sweep=tiny_comparison",
        f"algorithm={','.join(COMPARISON_SET)}",
        "hparams_seed=1",
        "steps=2",
        "checkpoint_freq=1",
        "backbone.width=16",
        "batch_size=16",
        "dataset.samples_per_domain=500",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    monkeypatch.setattr(sys, "argv", command)
    monkeypatch.chdir(repository)
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr()
    finally:
        GlobalHydra.instance().clear()
    capsys.readouterr()  # the runs' output, not collect's
    runs = {path.name.split(",")[0].removeprefix("algorithm="): path for path in sweep_dir.iterdir() if path.is_dir()}
    assert sorted(runs) == sorted(COMPARISON_SET)
    for algorithm, run_dir in runs.items():
        assert (run_dir / "done").exists()
        last = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()][-1]
        assert last["args"]["algorithm"] == NAMES[algorithm]
        # Each callback's last_penalty is recorded as DomainBed's `penalty`; GroupDRO records only its loss.
        assert ("penalty" in last) is (algorithm not in ("mixup", "groupdro"))
        # DomainBed's CORAL, MMD and SD return the cross-entropy alone as `loss` (issue 25).
        assert (last["loss"] == last["nll"]) is (algorithm in ("coral", "mmd", "sd", "mixup")), algorithm

    assert collect.main([str(sweep_dir), "--hparams"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("## Model selection: training-domain validation set") :]
    for algorithm in COMPARISON_SET:
        name = NAMES[algorithm]
        assert f"| {name} | " in section
        value = hparams_for(name, "Synthetic", hparams_seed=1, trial_seed=0)[OWN_HPARAM[algorithm]]
        assert f"| Synthetic | {name} | 0 | 0 | 1 | " in section and f"{OWN_HPARAM[algorithm]}={value:.3g}" in section


def test_per_domain_forward_keeps_the_batch_order_of_a_shuffled_batch():
    module = app_module(True, per_domain_forward=True)
    x, y, domains = (t[: E * B] for t in domain_batches(1))
    order = torch.randperm(E * B, generator=torch.Generator().manual_seed(0))
    captured = []
    module.classifier.register_forward_hook(lambda m, args, out: captured.append(out))
    module.log = lambda *args, **kwargs: None  # training_step called by hand, outside a Trainer
    logits_of = {}
    for name, perm in (("blocks", torch.arange(E * B)), ("shuffled", order)):
        captured.clear()
        module.training_step((x[perm], y[perm], domains[perm]), 0)
        logits_of[name] = captured[0]
    torch.testing.assert_close(logits_of["shuffled"], logits_of["blocks"][order])


def test_mixup_with_a_head_penalty_is_refused():
    """Mixup's head rows are the pairs' mixed inputs, not the batch's samples: a head penalty would pair them
    with other samples' targets (silently without trainable BatchNorm, issue 25)."""
    from fishr_lightning.app import AppError
    from fishr_lightning.baselines import SDCallback

    module = app_module(False, per_domain_forward=True, mixup_alpha=0.2)
    with pytest.raises(AppError, match=r"^Mixup \(mixup_alpha=0.2\) cannot run with SDCallback: Mixup feeds the head"):
        fit(module, [SDCallback()])
    assert "training_step" not in vars(module)  # the callback's wrapper is taken off again
