"""DomainBed's algorithms in the app (issues 26, 27): ``algorithm=<lowercase DomainBed name>`` builds
``fishr_lightning.domainbed.build_algorithm(name, ...)`` with the app's backbone and DomainBed's hyperparameters;
one run trains, records DomainBed's logged values and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_app_train import SMALL_SYNTHETIC, accuracies, final_weights, records, run_app

from fishr_lightning.app.training.run import CONFIG_MODULE, build_module, domainbed_options, load_model
from fishr_lightning.domainbed import ALGORITHM_CLASSES, algorithm_class, default_hparams

# The app runs these as its own module with head callbacks (configs/algorithm/{erm,fishr,irm,...}.yaml), equal to
# DomainBed's classes by tests/test_domainbed_comparison_set.py; every other algorithm as DomainBed's class.
APP_MODULE_ALGORITHMS = {"ERM", "Fishr", "IRM", "VREx", "CORAL", "MMD", "GroupDRO", "Mixup", "SD"}
DOMAINBED_CONFIGS = sorted(name for name in ALGORITHM_CLASSES if name not in APP_MODULE_ALGORITHMS)


@pytest.mark.parametrize("name", DOMAINBED_CONFIGS)
def test_every_domainbed_algorithm_is_a_config_the_app_builds_with_its_backbone(name):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"algorithm={name.lower()}"])
    GlobalHydra.instance().clear()
    assert cfg.algorithm.name == name and cfg.algorithm.domainbed is True and not cfg.algorithm.callbacks
    OmegaConf.set_struct(cfg, False)
    cfg.num_train_domains = 2
    hparams = default_hparams(name, "Synthetic")
    backbone = OmegaConf.to_container(cfg.backbone, resolve=False)
    backbone["dropout"] = 0.0
    if name == "ARM":  # images only (its context channel): tests/test_domainbed_adaptive.py builds it on the app's CNN
        return
    module = build_module(backbone, (2,), 2, hparams, domainbed=domainbed_options(cfg))
    assert type(module) is algorithm_class(name) and module.hparams == hparams
    assert module(torch.zeros(3, 2)).shape == (3, 2)  # DomainBed's predict, through the app's MLP


def test_an_app_run_of_a_two_optimizer_algorithm_records_domainbeds_values_and_resumes_exactly(monkeypatch, tmp_path):
    # URM steps two optimizers per update and draws its noise from (seed, update): a run killed after 4 updates
    # and resumed ends on the uninterrupted run's weights, records and accuracies.
    options = ["algorithm=urm", *SMALL_SYNTHETIC, "steps=6", "checkpoint_freq=2"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert run_app(monkeypatch, uninterrupted, *options) == 0
    written = records(uninterrupted)
    assert [r["step"] for r in written] == [0, 2, 4, 5] and all(r["loss"] > 0 for r in written)  # DomainBed's keys
    killed = ["+callbacks.stop._target_=data_factories.InterruptAfter", "+callbacks.stop.updates=4"]
    assert run_app(monkeypatch, interrupted, *options, *killed) != 0
    assert run_app(monkeypatch, interrupted, *options, "ckpt_path=last") == 0
    assert accuracies(interrupted) == accuracies(uninterrupted)
    assert [r["loss"] for r in records(interrupted)] == pytest.approx([r["loss"] for r in written], rel=1e-6)
    expected, resumed = final_weights(uninterrupted), final_weights(interrupted)
    assert any(name.startswith("discriminator.") for name in expected)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], msg=name)
    assert type(load_model(uninterrupted / "model.pt")).__name__ == "URM"  # model.pt rebuilds DomainBed's class
