"""``protocol=classic|2024`` (issue 27): one switch between the Fishr paper's DomainBed and DomainBed's since
July 2024, recorded in every run's arguments and kept apart by ``fishr-collect``."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fishr_lightning.app import AppError
from fishr_lightning.app.reporting import collect
from fishr_lightning.app.training.run import CONFIG_MODULE, apply_protocol, resolve_hparams
from fishr_lightning.domainbed import default_hparams


def composed(overrides: list[str]):
    """The config as the app sees it, HydraConfig included (the choices and the command line's overrides)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(autouse=True)
def fresh_hydra():
    yield
    GlobalHydra.instance().clear()


def test_2024_trains_domainbeds_2024_backbone_and_registry_the_classic_stays_the_default():
    classic = composed(["dataset=pacs"])
    apply_protocol(classic)
    assert classic.protocol == "classic"
    assert classic.backbone._target_.endswith("ResNetFeaturizer") and classic.backbone.freeze_batchnorm
    assert "freeze_bn" not in resolve_hparams(classic)

    recent = composed(["dataset=pacs", "protocol=2024", "backbone.pretrained=false"])
    apply_protocol(recent)
    # DomainBed's 2024 networks.ResNet: timm's resnet50.ram_in1k, BatchNorm trained; the override carried over.
    assert recent.backbone.name == "resnet50.ram_in1k" and recent.backbone.freeze_bn is False
    assert recent.backbone.pretrained is False
    hparams = resolve_hparams(recent)
    # DomainBed's 2024 registry: its new keys, every classic key drawn as before.
    assert {k: hparams[k] for k in ("resnet50_augmix", "freeze_bn", "vit", "dinov2", "lars", "linear_steps")} == {
        "resnet50_augmix": True, "freeze_bn": False, "vit": False, "dinov2": False, "lars": False, "linear_steps": 500
    }  # fmt: skip
    assert default_hparams("Fishr", "PACS").items() <= default_hparams("Fishr", "PACS", "2024").items()


def test_a_backbone_chosen_on_the_command_line_stays_and_mnist_keeps_its_cnn():
    chosen = composed(["dataset=pacs", "protocol=2024", "backbone=resnet50"])
    apply_protocol(chosen)
    assert chosen.backbone._target_.endswith("ResNetFeaturizer")
    mnist = composed(["dataset=rotated_mnist", "protocol=2024"])
    apply_protocol(mnist)
    assert mnist.backbone._target_.endswith("MNISTCNN")


def test_an_option_of_the_classic_backbone_under_2024_and_an_unknown_protocol_are_errors():
    with pytest.raises(AppError, match=r"backbone.depth is an option of the classic ResNet-50.*backbone=resnet50"):
        apply_protocol(composed(["dataset=pacs", "protocol=2024", "backbone.depth=50"]))
    with pytest.raises(AppError, match=r"protocol=2021: DomainBed's protocols are classic .* and 2024"):
        apply_protocol(composed(["protocol=2021"]))


def test_fishr_collect_keeps_the_protocols_apart_and_says_which_a_table_comes_from(tmp_path, capsys):
    def run(name: str, protocol: str | None, accuracy: float, trial_seed: int) -> None:
        record = {
            "step": 10,
            "env0_in_acc": accuracy,
            "env0_out_acc": accuracy,
            "env1_in_acc": 0.9,
            "env1_out_acc": 0.8,
        }
        record["args"] = {
            "dataset": "PACS",
            "algorithm": "ERM",
            "test_envs": [0],
            "hparams_seed": 0,
            "trial_seed": trial_seed,
        }
        if protocol is not None:
            record["args"]["protocol"] = protocol
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text(json.dumps(record) + "\n")
        (tmp_path / name / "done").write_text("done\n")

    run("before_issue_27", None, 0.5, trial_seed=0)  # recorded before the switch existed: the classic protocol
    run("classic", "classic", 0.7, trial_seed=1)
    assert collect.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Protocol: classic" in out and "| ERM | 60.0 ± 7.1 |" in out  # one experiment: pooled

    run("recent", "2024", 0.9, trial_seed=0)
    assert collect.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Protocols: 2024, classic" in out
    assert "| ERM [protocol=2024] | 90.0 ± 0.0 |" in out and "| ERM [protocol=classic] | 60.0 ± 7.1 |" in out
