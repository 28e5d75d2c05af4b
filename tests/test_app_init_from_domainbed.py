"""``init_from=`` DomainBed's ``model.pkl`` (issue 26): its ``model_dict`` (``algorithm.state_dict()``) starts the
app's module of the same algorithm (DomainBed's aliases and training state dropped, its MNIST GroupNorms renamed)
or a DomainBed class (``load_domainbed_state_dict``); a different algorithm, key or shape is one error naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from domainbed_harness import TinyFeaturizer
from test_app_train import SMALL_SYNTHETIC, run_app
from torch import nn

from fishr_lightning.app import AppError
from fishr_lightning.app.training.backbones import MNISTCNN, ResNetFeaturizer
from fishr_lightning.app.training.initialisation import load_init
from fishr_lightning.app.training.module import DomainClassifier
from fishr_lightning.domainbed import build_algorithm, default_hparams, networks


def write_model_pkl(path, algorithm, model_dict, input_shape=(6,), num_classes=3, num_domains=3):
    """DomainBed's train.py ``save_checkpoint``: its args, the algorithm's constructor arguments and state dict;
    the hyperparameters of a random draw hold NumPy scalars (``r.choice``)."""
    hparams = {**default_hparams(algorithm, "PACS"), "resnet_dropout": np.float64(0.1), "batch_size": np.int64(32)}
    torch.save(
        {
            "args": {"algorithm": algorithm, "dataset": "PACS", "test_envs": [0], "hparams": None, "seed": 0},
            "model_input_shape": input_shape,
            "model_num_classes": num_classes,
            "model_num_domains": num_domains,
            "model_hparams": hparams,
            "model_dict": model_dict,
        },
        path,
    )
    return path


def domainbed_erm_dict(featurizer: nn.Module, classifier: nn.Module, **buffers) -> dict[str, torch.Tensor]:
    """DomainBed's ERM-like state dict: featurizer.*, classifier.*, their aliases network.0.*/network.1.*."""
    state = {}
    for prefix, network in (("featurizer", featurizer), ("classifier", classifier)):
        state |= {f"{prefix}.{k}": v for k, v in network.state_dict().items()}
    for alias, prefix in (("network.0", "featurizer"), ("network.1", "classifier")):
        state |= {f"{alias}.{k[len(prefix) + 1 :]}": v for k, v in list(state.items()) if k.startswith(prefix + ".")}
    return state | buffers


def test_a_domainbed_irm_model_pkl_starts_the_apps_irm_module(tmp_path):
    torch.manual_seed(1)
    featurizer, classifier = TinyFeaturizer((6,), {}), nn.Linear(5, 3)
    model_dict = domainbed_erm_dict(featurizer, classifier, update_count=torch.tensor([500]))
    path = write_model_pkl(tmp_path / "model.pkl", "IRM", model_dict)
    module = DomainClassifier(TinyFeaturizer((6,), {}), num_classes=3)
    load_init(module, path, {}, (6,), 3, "IRM")
    x = torch.randn(4, 6)
    torch.testing.assert_close(module(x), classifier(featurizer(x)), rtol=0, atol=0)

    with pytest.raises(
        AppError, match=r"does not fit.*algorithm IRM \(this run: Fishr\).*num_classes 3 \(this run: 4\)"
    ):
        load_init(module, path, {}, (6,), 4, "Fishr")
    model_dict["discriminator.weight"] = torch.zeros(2)
    model_dict["network.1.bias"] = torch.zeros(3)
    del model_dict["classifier.weight"], model_dict["network.1.weight"]
    write_model_pkl(path, "IRM", model_dict)
    with pytest.raises(AppError) as error:
        load_init(module, path, {}, (6,), 3, "IRM")
    assert "network.1.bias is not classifier.bias" in str(error.value)
    assert "missing keys classifier.weight" in str(error.value)
    assert "unexpected keys discriminator.weight" in str(error.value)


def test_a_domainbed_model_pkl_starts_a_domainbed_class_with_every_key(tmp_path):
    """GroupDRO's q after DomainBed's first update has one weight per domain: the empty q is resized to load it."""
    hparams = default_hparams("GroupDRO", "PACS")
    torch.manual_seed(2)
    featurizer, classifier = TinyFeaturizer((6,), {}), nn.Linear(5, 3)
    q = torch.tensor([0.2, 0.3, 0.5])
    path = write_model_pkl(tmp_path / "model.pkl", "GroupDRO", domainbed_erm_dict(featurizer, classifier, q=q))
    module = build_algorithm("GroupDRO", (6,), 3, 3, hparams, TinyFeaturizer)
    load_init(module, path, {}, (6,), 3, "GroupDRO")
    assert torch.equal(module.q, q)
    x = torch.randn(4, 6)
    torch.testing.assert_close(module.predict(x), classifier(featurizer(x)), rtol=0, atol=0)
    two_domains = build_algorithm("GroupDRO", (6,), 3, 2, hparams, TinyFeaturizer)
    with pytest.raises(AppError, match=r"num_domains 3 \(this run: 2\)"):
        load_init(two_domains, path, {}, (6,), 3, "GroupDRO")
    write_model_pkl(path, "GroupDRO", domainbed_erm_dict(featurizer, classifier))  # q missing
    with pytest.raises(AppError, match=r"model\.pkl\) does not fit.*missing keys: q"):
        load_init(module, path, {}, (6,), 3, "GroupDRO")


def test_domainbeds_resnet_and_mnist_networks_load_into_the_apps_backbones(tmp_path):
    """DomainBed's ResNet featurizer has the app's ResNetFeaturizer's keys and shapes (torchvision's, without
    fc); its MNIST_CNN's GroupNorms bn0..bn3 are the app's MNISTCNN's norm1..norm4: the same features."""
    with torch.device("meta"):  # shapes only: no 11 M random weights drawn
        domainbed_resnet = networks.ResNet((3, 224, 224), {"resnet18": True}, pretrained=False)
        app_resnet = ResNetFeaturizer((3, 224, 224), depth=18, pretrained=False)
    assert {k: v.shape for k, v in domainbed_resnet.state_dict().items()} == {
        k: v.shape for k, v in app_resnet.state_dict().items()
    }
    torch.manual_seed(3)
    mnist, classifier = networks.MNIST_CNN((2, 28, 28)), nn.Linear(128, 2)
    path = write_model_pkl(tmp_path / "model.pkl", "ERM", domainbed_erm_dict(mnist, classifier), (2, 28, 28), 2)
    module = DomainClassifier(MNISTCNN((2, 28, 28)), num_classes=2)
    load_init(module, path, {}, (2, 28, 28), 2, "ERM")
    x = torch.randn(1, 2, 8, 8)  # any size: the CNN mean-pools
    torch.testing.assert_close(module(x), classifier(mnist(x)), rtol=0, atol=0)
    # DomainBed's ERM class with the app's CNN as featurizer (domainbed: true): the aliases renamed too.
    hparams = default_hparams("ERM", "ColoredMNIST")
    domainbed_erm = build_algorithm("ERM", (2, 28, 28), 2, 3, hparams, lambda shape, _: MNISTCNN(shape))
    load_init(domainbed_erm, path, {}, (2, 28, 28), 2, "ERM")
    torch.testing.assert_close(domainbed_erm.predict(x), classifier(mnist(x)), rtol=0, atol=0)


def test_the_app_names_the_algorithm_of_a_model_pkl_trained_by_another(monkeypatch, tmp_path, capsys):
    torch.manual_seed(4)
    model_dict = domainbed_erm_dict(TinyFeaturizer((6,), {}), nn.Linear(5, 3), update_count=torch.tensor([0]))
    path = write_model_pkl(tmp_path / "model.pkl", "Fishr", model_dict)
    assert run_app(monkeypatch, tmp_path / "run", *SMALL_SYNTHETIC, "algorithm=erm", f"init_from={path}") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "(DomainBed's model.pkl) does not fit this run's model: algorithm Fishr (this run: ERM)" in err
    assert not (tmp_path / "run" / "results.jsonl").exists()
