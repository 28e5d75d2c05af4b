"""The training app's config tree: every dataset × backbone × algorithm composes, the menu's
choices are the documented ones, and the installed package finds the configs (Hydra #559)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fishr_lightning.app.data.specs import dataset_spec
from fishr_lightning.app.training.run import CONFIG_MODULE
from fishr_lightning.domainbed import ALGORITHM_CLASSES

DATASETS = [
    "synthetic",
    "colored_mnist",
    "rotated_mnist",
    "vlcs",
    "pacs",
    "office_home",
    "terra_incognita",
    "domain_net",
    "wilds_camelyon",
    "wilds_fmow",
]
# Issue 28's datasets: their configs are checked by tests/test_app_datasets.py (composing each with every
# backbone and algorithm here would cost ~0.2 s a composition).
LATER_DATASETS = [
    "sviro",
    *(f"spawrious_{kind}_{level}" for kind in ("o2o", "m2m") for level in ("easy", "medium", "hard")),
    "image_folders",
]
BACKBONES = ["resnet50", "resnet18", "mnist_cnn", "mlp"]
# timm's (tests/test_timm_backbones.py composes and builds each of them)
TIMM_BACKBONES = ["timm", "resnet50_augmix", "dinov2_vitb14", "clip_vitb16", "convnext_tiny", "vit_small"]
ALGORITHMS = ["erm", "fishr", "irm", "vrex", "coral", "mmd", "groupdro", "mixup", "sd"]
ALGORITHM_NAMES = dict(zip(ALGORITHMS, ["ERM", "Fishr", "IRM", "VREx", "CORAL", "MMD", "GroupDRO", "Mixup", "SD"]))
# DomainBed's algorithms built by fishr_lightning.domainbed (domainbed: true); tests/test_domainbed_*.py compose them.
TOP_LEVEL_KEYS = {
    "data_dir",
    "test_envs",
    "seed",
    "trial_seed",
    "hparams_seed",
    "holdout_fraction",
    "steps",
    "checkpoint_freq",
    "batch_size",
    "ckpt_path",
}


@pytest.fixture(autouse=True)
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def compose_train(overrides: list[str]):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_the_configs_are_the_installed_package():
    from fishr_lightning.app import configs

    assert Path(configs.__file__).parent.name == "configs"
    assert (Path(configs.__file__).parent / "train.yaml").is_file()


def test_every_group_offers_the_documented_menu():
    root = Path(__import__("fishr_lightning.app.configs", fromlist=["x"]).__file__).parent
    assert {p.stem for p in (root / "dataset").glob("*.yaml")} == set(DATASETS) | set(LATER_DATASETS)
    assert {p.stem for p in (root / "backbone").glob("*.yaml")} == set(BACKBONES) | set(TIMM_BACKBONES)
    # The head-callback algorithms, and every algorithm fishr_lightning.domainbed builds, by its lowercase name.
    assert {p.stem for p in (root / "algorithm").glob("*.yaml")} == set(ALGORITHMS) | {
        n.lower() for n in ALGORITHM_CLASSES
    }
    assert {"cpu", "gpu", "ddp"} <= {p.stem for p in (root / "trainer").glob("*.yaml")}
    assert {"csv", "tensorboard", "wandb", "mlflow"} <= {p.stem for p in (root / "logger").glob("*.yaml")}


# Every dataset x backbone with ERM and Fishr; the comparison set's configs on two of them (composing is
# independent of the dataset, and each composition costs ~0.2 s).
# The datasets of issue 28 compose as the others (test_the_wilds_datasets_take_domainbeds_steps_and_backbone).
COMBINATIONS = list(itertools.product(DATASETS[:8], BACKBONES, ALGORITHMS[:2])) + [
    (dataset, backbone, algorithm)
    for dataset, backbone in (("synthetic", "mlp"), ("pacs", "resnet50"))
    for algorithm in ALGORITHMS[2:]
]


@pytest.mark.parametrize("dataset,backbone,algorithm", COMBINATIONS)
def test_every_dataset_backbone_algorithm_composes(dataset, backbone, algorithm):
    cfg = compose_train([f"dataset={dataset}", f"backbone={backbone}", f"algorithm={algorithm}"])
    assert TOP_LEVEL_KEYS <= set(cfg)
    assert cfg.test_envs == [0] and cfg.holdout_fraction == 0.2 and cfg.hparams_seed == 0
    assert cfg.steps == cfg.dataset.steps and cfg.checkpoint_freq == cfg.dataset.checkpoint_freq
    spec = dataset_spec(cfg.dataset.name)  # every dataset config names a dataset the app knows
    assert spec.num_classes >= 2
    assert cfg.backbone._target_.startswith("fishr_lightning.app.training.backbones.")
    assert cfg.algorithm.name == ALGORITHM_NAMES[algorithm]
    if algorithm == "fishr":
        assert cfg.algorithm.callbacks.fishr._target_ == "fishr_lightning.FishrCallback"
        assert cfg.algorithm.callbacks.fishr.head == "classifier"
    elif algorithm in ("erm", "mixup"):  # Mixup changes the inputs: the module's, not a callback's
        assert dict(cfg.algorithm.callbacks) == {}
    else:
        (callback,) = cfg.algorithm.callbacks.values()
        assert callback._target_.startswith("fishr_lightning.baselines.") and callback.head == "classifier"
    # DomainBed runs CORAL, MMD, GroupDRO and Mixup with one forward per domain (trainable BatchNorm).
    per_domain = algorithm in ("coral", "mmd", "groupdro", "mixup")
    assert cfg.algorithm.get("module", {}).get("per_domain_forward", False) is per_domain


@pytest.mark.parametrize(
    "dataset,backbone",
    [
        ("synthetic", "mlp"),
        ("colored_mnist", "mnist_cnn"),
        ("rotated_mnist", "mnist_cnn"),
        ("pacs", "resnet50"),
        ("domain_net", "resnet50"),
    ],
)
def test_each_dataset_defaults_to_domainbeds_backbone(dataset, backbone):
    cfg = compose_train([f"dataset={dataset}"])
    expected = compose_train([f"dataset={dataset}", f"backbone={backbone}"])
    assert OmegaConf.to_container(cfg.backbone) == OmegaConf.to_container(expected.backbone)


@pytest.mark.parametrize(("dataset", "name"), [("wilds_camelyon", "WILDSCamelyon"), ("wilds_fmow", "WILDSFMoW")])
def test_the_wilds_datasets_take_domainbeds_steps_and_backbone(dataset, name):
    # DomainBed's WILDSDataset sets neither N_STEPS nor CHECKPOINT_FREQ: MultipleDomainDataset's 5001 and 100.
    cfg = compose_train([f"dataset={dataset}", "algorithm=fishr"])
    assert cfg.dataset.name == name and (cfg.steps, cfg.checkpoint_freq) == (5001, 100)
    assert cfg.backbone._target_.endswith(".ResNetFeaturizer") and cfg.backbone.depth == 50 and cfg.backbone.pretrained
    assert cfg.dataset.image_size == 224 and dataset_spec(name).download_name == dataset


def test_resnets_are_pretrained_with_frozen_batchnorm_and_a_local_weights_option():
    for depth, name in ((50, "resnet50"), (18, "resnet18")):
        backbone = compose_train([f"backbone={name}"]).backbone
        assert backbone.depth == depth and backbone.pretrained is True
        assert backbone.freeze_batchnorm is True and "weights_path" in backbone


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainer_configs_instantiate_lightning_trainers(trainer):
    cfg = compose_train([f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if trainer == "ddp":
        assert cfg.trainer.strategy == "ddp" and "devices" in cfg.trainer and "num_nodes" in cfg.trainer


def test_callbacks_group_is_empty_by_default_and_extensible():
    assert dict(compose_train([]).callbacks) == {}
    cfg = compose_train(["+callbacks=lr_monitor"])
    assert cfg.callbacks.lr_monitor._target_ == "lightning.pytorch.callbacks.LearningRateMonitor"


def test_an_unknown_choice_lists_the_available_ones():
    with pytest.raises(Exception) as error:
        compose_train(["dataset=imagenet"])
    message = str(error.value)
    assert "imagenet" in message and "pacs" in message and "colored_mnist" in message


def test_hparams_search_from_the_command_line_draws_records_and_refuses():
    """issue 26 (the paper's Table 13): +hparams_search.NAME=[kind,a,b] changes that name's draw, is recorded
    in args (fishr-collect keys on it; a finished run with the registry's distribution is another run), and bad
    input is an AppError."""
    from fishr_lightning.app import AppError
    from fishr_lightning.app.reporting.collect import differing_arguments, experiment_arguments
    from fishr_lightning.app.training.hparams import hparams_for
    from fishr_lightning.app.training.run import resolve_hparams, run_args
    from fishr_lightning.app.training.run_directory import settings_differences

    table_13 = ["algorithm=fishr", "dataset=pacs", "hparams_seed=4", "+hparams_search.lambda=[log10_uniform,1,5]"]
    cfg, registry_cfg = compose_train(table_13), compose_train(table_13[:3])
    hparams, registry_hparams = resolve_hparams(cfg), resolve_hparams(registry_cfg)
    assert hparams == {**registry_hparams, "lambda": hparams["lambda"]} != registry_hparams
    # 10^(1 + 3u) becomes 10^(1 + 4u): the same uniform number u of lambda's own RandomState.
    assert hparams["lambda"] == pytest.approx(hparams_for("Fishr", "PACS", 4, 0)["lambda"] ** (4 / 3) / 10 ** (1 / 3))
    args, registry_args = run_args(cfg, Path("run"), [0]), run_args(registry_cfg, Path("run"), [0])
    assert args == {**registry_args, "hparams_search": {"lambda": ["log10_uniform", 1.0, 5.0]}}
    assert experiment_arguments({"args": args}) != experiment_arguments({"args": registry_args})
    # Two sweeps in one tree: hparams_search is the axis, not each run's lambda (it differs by construction).
    records = [{"args": registry_args, "hparams": registry_hparams}, {"args": args, "hparams": hparams}]
    assert differing_arguments(records) == {"PACS": ["hparams_search"]}
    assert [
        name for name, *_ in settings_differences({"args": registry_args, "hparams": registry_hparams}, args, hparams)
    ] == ["hparams.lambda"]
    other = compose_train([*table_13[:3], "+hparams_search.lambda=[log10_uniform,1,4.5]"])
    assert "args.hparams_search" in [
        n
        for n, *_ in settings_differences(
            {"args": args, "hparams": hparams}, run_args(other, Path("run"), [0]), resolve_hparams(other)
        )
    ]
    # One sweep over ERM and Fishr changes Fishr's: the ERM runs record nothing and draw as before.
    erm = compose_train(
        ["algorithm=erm", "dataset=pacs", "hparams_seed=4", "+hparams_search.Fishr.lambda=[log10_uniform,1,5]"]
    )
    assert resolve_hparams(erm) == hparams_for("ERM", "PACS", 4, 0) | {"resnet18": False}
    assert "hparams_search" not in run_args(erm, Path("run"), [0])
    with pytest.raises(
        AppError,
        match=r"'lambda' is not a hyperparameter of ERM on PACS.*It is [\w, ]*Fishr's: write \+hparams_search\.\w+\.lambda",
    ):
        resolve_hparams(compose_train(["algorithm=erm", "dataset=pacs", "+hparams_search.lambda=[log10_uniform,1,5]"]))


def test_vrex_ema_is_an_hparam_of_vrex_off_unless_given():
    """Issue 26: +hparams.vrex_ema=0.95 (the Fishr paper's "V-REx with EMA") reaches VRExCallback and the run's
    recorded hyperparameters; without it the registry is DomainBed's and the callback is DomainBed's V-REx."""
    from omegaconf import open_dict

    from fishr_lightning.app.training.hparams import default_hparams
    from fishr_lightning.app.training.run import instantiate_callbacks, resolve_hparams

    for overrides, ema in (([], 0.0), (["+hparams.vrex_ema=0.95"], 0.95)):
        cfg = compose_train(["dataset=synthetic", "backbone=mlp", "algorithm=vrex", *overrides])
        hparams = resolve_hparams(cfg)
        assert {k: v for k, v in hparams.items() if k != "vrex_ema"} == default_hparams("VREx", "Synthetic")
        assert hparams.get("vrex_ema") == (ema or None)
        with open_dict(cfg):
            cfg.hparams, cfg.num_train_domains = hparams, 2  # as run.py sets them before instantiating
        (callback,) = instantiate_callbacks(cfg.algorithm.callbacks)
        assert callback.ema == ema
