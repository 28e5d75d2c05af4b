"""timm backbones (issue 12): ``backbone=timm`` and its presets in the app, Fishr on the heads of
timm models used directly, local weights, the speed options, and bad input. Tiny models, no
downloads (``pretrained=False``; weights files written by the tests)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from data_factories import write_pacs
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from fishr_lightning import FishrCallback
from fishr_lightning.app import AppError
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.image_folders import use_input_config
from fishr_lightning.app.training.module import DomainClassifier
from fishr_lightning.app.training.run import CONFIG_MODULE, main
from fishr_lightning.app.training.timm_backbone import TimmFeaturizer
from fishr_lightning.functional import closed_form_moments, domain_gradient_variance, logit_gradients
from fishr_lightning.heads import resolve_head

PRESETS = {
    "resnet50_augmix": ("resnet50.ram_in1k", False),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", None),
    "clip_vitb16": ("vit_base_patch16_clip_224.openai", None),
    "convnext_tiny": ("convnext_tiny.fb_in1k", None),
    "vit_small": ("vit_small_patch16_224.augreg_in21k_ft_in1k", None),
}


@pytest.fixture(autouse=True)
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


# -- the app --------------------------------------------------------------------------------------


def run_app(monkeypatch, run_dir: Path, *overrides: str) -> int:
    argv = ["fishr-train", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    monkeypatch.setattr(sys, "argv", [*argv, f"hydra.run.dir={run_dir}", *overrides])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_the_app_trains_fishr_through_a_timm_vit_and_convnext_on_pacs(monkeypatch, tmp_path, name):
    data_dir, run_dir = write_pacs(tmp_path / "data", images_per_class=2, size=20), tmp_path / "run"
    status = run_app(
        monkeypatch,
        run_dir,
        "dataset=pacs",
        f"data_dir={data_dir}",
        "algorithm=fishr",
        "backbone=timm",
        f"backbone.name={name}",
        "backbone.pretrained=false",
        "backbone.image_size=32",
        "backbone.drop_path_rate=0.1",
        "batch_size=2",
        "steps=3",
        "checkpoint_freq=3",
        "+hparams.penalty_anneal_iters=1",
        "+hparams.lambda=10",
        "loader.num_workers=0",
        "test_envs=[3]",
    )
    assert status == 0
    last = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["args"]["backbone"] == "timm" and last["args"]["algorithm"] == "Fishr"
    assert last["penalty"] >= 0 and last["loss"] > last["nll"]  # λ·P in the objective through the timm features
    weights = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]  # save_model=weights
    assert weights["classifier.weight"].shape[0] == 7 and any(k.startswith("featurizer.model.") for k in weights)


def test_the_transforms_take_the_models_size_mean_and_std(tmp_path):
    data_dir = write_pacs(tmp_path / "data", images_per_class=1, size=20)
    data = load_domains("PACS", data_dir, image_size=224, pipeline="domainbed")
    featurizer = TimmFeaturizer((3, 224, 224), "vit_tiny_patch16_224", pretrained=False, image_size=48)
    use_input_config(data, featurizer.input_config, augment=True)
    train_steps, eval_steps = data.train_transform.transforms, data.eval_transform.transforms
    assert train_steps[0].size == (48, 48) and train_steps[0].scale == (0.7, 1.0)  # DomainBed's crop
    assert [type(t) for t in train_steps[1:4]] == [
        transforms.RandomHorizontalFlip,
        transforms.ColorJitter,
        transforms.RandomGrayscale,
    ]
    assert tuple(train_steps[-1].mean) == (0.5, 0.5, 0.5) == tuple(eval_steps[-1].std)  # the ViT's, not ImageNet's
    assert eval_steps[0].size == (48, 48) and data.input_shape == (3, 48, 48)
    assert data.eval_transform(data.domains[0][0][0]).shape == (3, 48, 48)
    # The fast pipeline (issue 20): the workers' size, the device part's mean and std.
    fast = load_domains("PACS", data_dir, image_size=224, pipeline="fast")
    use_input_config(fast, featurizer.input_config, augment=True)
    assert fast.train_transform.output_size == fast.eval_transform.output_size == 48 and fast.train_transform.augment
    assert fast.batch_transform.mean == (0.5, 0.5, 0.5) == fast.batch_transform.std and fast.input_shape == (3, 48, 48)
    assert fast.eval_transform(fast.domains[0][0][0]).pixels.shape == (3, 48, 48)


def compose_train(overrides: list[str]):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_composes_and_builds_its_architecture(preset):
    cfg = compose_train(["dataset=pacs", f"backbone={preset}", "backbone.pretrained=false"])
    name, freeze_bn = PRESETS[preset]
    assert cfg.backbone._target_ == "fishr_lightning.app.training.timm_backbone.TimmFeaturizer"
    assert cfg.backbone.name == name and cfg.backbone.freeze_bn == freeze_bn
    assert name in timm.list_models(name.split(".")[0], pretrained=True)  # a real weight tag
    node = OmegaConf.to_container(cfg.backbone, resolve=False)
    node.pop("dropout")
    featurizer = instantiate(node, input_shape=(3, 224, 224))
    assert featurizer.input_config["input_size"] == (3, 224, 224)
    assert featurizer.n_outputs == featurizer.model.num_features
    assert featurizer.freeze_bn == (preset != "resnet50_augmix" and "resnet" in preset)


def test_the_default_backbone_stays_torchvisions_resnet50():
    cfg = compose_train(["dataset=pacs"])
    assert (
        cfg.backbone._target_ == "fishr_lightning.app.training.backbones.ResNetFeaturizer" and cfg.backbone.depth == 50
    )


# -- Fishr on timm models used directly ------------------------------------------------------------


class TimmClassifier(pl.LightningModule):
    """A user's module: a timm classifier as is, no app."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__()
        self.model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y, _domain = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def domain_batches(n: int = 12, size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=generator)
    y, domain = torch.arange(n) % 3, torch.arange(n) % 2
    return DataLoader(TensorDataset(x, y, domain), batch_size=n)


@pytest.mark.parametrize(
    "name, kwargs, head",
    [
        ("vit_tiny_patch16_224", {"img_size": 32}, "model.head"),
        ("resnet18", {}, "model.fc"),
        ("convnext_atto", {}, "model.head.fc"),
    ],
)
def test_fishr_callback_finds_the_head_of_a_timm_model(name, kwargs, head):
    torch.manual_seed(0)
    module = TimmClassifier(name, **kwargs)
    assert resolve_head(module.model, None)[0] == head.removeprefix("model.")
    callback = FishrCallback(penalty_weight=100.0, warmup_steps=0, num_domains=2)
    erm = copy.deepcopy(module)
    trainer_args = {"max_steps": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    pl.Trainer(callbacks=[callback], enable_model_summary=False, **trainer_args).fit(module, domain_batches())
    pl.Trainer(enable_model_summary=False, **trainer_args).fit(erm, domain_batches())
    assert callback.head == head and callback._head_module is module.get_submodule(head)
    trained, reference = module.get_submodule(head).weight, erm.get_submodule(head).weight
    assert torch.isfinite(trained).all() and not torch.allclose(trained, reference)  # the penalty acted


def test_closed_form_equals_per_sample_gradients_on_a_tiny_vits_real_head():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32).double().eval()
    x, y = torch.randn(10, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (10,))
    domains = torch.tensor([0, 1, 2] * 3 + [1])
    features_ND = model.forward_head(model.forward_features(x), pre_logits=True)
    logits_NC = model.head(features_ND)
    torch.testing.assert_close(logits_NC, model(x))  # the features are the head's real input
    moments = closed_form_moments(features_ND, logit_gradients(logits_NC, y), domains, num_domains=3)
    per_sample = []
    for i in range(len(y)):  # the reference: each sample's own gradient of the head, by autograd
        loss = F.cross_entropy(model.head(features_ND[i : i + 1].detach()), y[i : i + 1])
        weight_grad, bias_grad = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
        per_sample.append(torch.cat([weight_grad.reshape(-1), bias_grad]))
    grads_NP = torch.stack(per_sample)
    reference = torch.stack([grads_NP[domains == e].var(dim=0, unbiased=False) for e in range(3)])
    torch.testing.assert_close(domain_gradient_variance(moments), reference, rtol=1e-9, atol=1e-15)


# -- weights, BatchNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weights_file_is_loaded_classifier_and_all(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)  # with its 1000-class fc, as hub files are
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = TimmFeaturizer((3, 32, 32), "test_resnet", weights_path=str(path), image_size=32)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])
    source.reset_classifier(0)
    torch.testing.assert_close(loaded.eval()(torch.ones(2, 3, 32, 32)), source.eval()(torch.ones(2, 3, 32, 32)))


def test_weights_of_another_model_are_refused_with_the_mismatched_keys(tmp_path):
    torch.save(timm.create_model("test_convnext", pretrained=False).state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(AppError) as error:
        TimmFeaturizer((3, 32, 32), "test_resnet", weights_path=str(tmp_path / "convnext.pth"), image_size=32)
    message = str(error.value)
    assert "does not match timm's test_resnet" in message and "missing" in message and "unexpected" in message
    assert "stem" in message or "stages" in message  # names some of the keys
    with pytest.raises(AppError, match="is not a file"):
        TimmFeaturizer((3, 32, 32), "test_resnet", weights_path=str(tmp_path / "absent.pth"))


def test_unreachable_hub_weights_name_the_two_ways_out(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr("timm.models._builder.load_pretrained", no_network)
    with pytest.raises(AppError) as error:
        TimmFeaturizer((3, 32, 32), "resnet18.a1_in1k", pretrained=True, image_size=32)
    assert "backbone.pretrained=false" in str(error.value) and "backbone.weights_path=" in str(error.value)
    assert "https://huggingface.co/timm/resnet18.a1_in1k" in str(error.value)  # where to fetch the file


def test_batchnorm_is_frozen_by_default_for_resnets_and_trainable_on_request():
    frozen = TimmFeaturizer((3, 32, 32), "resnet18", pretrained=False, image_size=32).train()
    assert frozen.freeze_bn and frozen.training and not frozen.model.bn1.training
    trained = TimmFeaturizer((3, 32, 32), "resnet18", pretrained=False, image_size=32, freeze_bn=False).train()
    assert trained.model.bn1.training
    assert not TimmFeaturizer((3, 32, 32), "convnext_atto", pretrained=False, image_size=32).freeze_bn  # LayerNorm


# -- speed options --------------------------------------------------------------------------------


def train_a_few_steps(model: str, **options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    featurizer = TimmFeaturizer((3, 32, 32), model, pretrained=False, image_size=32, **options)
    module = DomainClassifier(featurizer, num_classes=3, lr=1e-3)
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        loss = F.cross_entropy(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# compile on timm's test_resnet (BatchNorm frozen, as the resnet presets): inductor builds 31 CPU kernels for
# its training step where test_convnext needs 51: the test takes 24 s instead of 33-39 s cold on 2 cores (issue 30).
@pytest.mark.parametrize(
    ("model", "options"),
    [("test_convnext", {"channels_last": True}), ("test_resnet", {"compile": True})],
    ids=["channels_last", "compile"],
)
def test_speed_options_train_to_the_eager_weights(model, options):
    eager = train_a_few_steps(model)
    fast = train_a_few_steps(model, **options)
    assert fast.keys() == eager.keys()  # compile keeps the state dict's names
    for key, value in eager.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-4, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------------


def test_an_unknown_model_name_lists_close_matches():
    with pytest.raises(AppError) as error:
        TimmFeaturizer((3, 32, 32), "vit_tinny_patch16_224", pretrained=False)
    assert "vit_tiny_patch16_224" in str(error.value) and "timm.list_models(" in str(error.value)


def test_an_unknown_weight_tag_lists_the_models_tags():
    for pretrained in (True, False):
        with pytest.raises(AppError, match="resnet18.a1_in1k"):
            TimmFeaturizer((3, 32, 32), "resnet18.in1k_nonexistent", pretrained=pretrained)


def test_a_model_without_pooled_features_is_refused():
    with pytest.raises(AppError, match="not pooled"):
        TimmFeaturizer((3, 32, 32), "resnet18", pretrained=False, image_size=32, model_kwargs={"global_pool": ""})
