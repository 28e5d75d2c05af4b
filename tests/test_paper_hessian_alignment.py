"""Hessian-alignment diagnostics (issue 5; Fishr paper, Table 1 and Fig. 3).

References are materialised here: the Hessian of each domain's mean loss w.r.t. the flattened head
parameters with ``torch.autograd.functional.hessian``, and per-sample gradients one sample at a time.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning import FishrInputError
from fishr_lightning.diagnostics.hessian_alignment import (
    HessianAlignmentCallback,
    alignment_metrics,
    head_gradient_variances,
    head_hessian_diagonals,
)

ROOT = Path(__file__).resolve().parents[1]


def domain_loss(loss_name, logits, targets):
    if loss_name == "cross_entropy":
        return F.cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets.reshape(logits.shape).to(logits.dtype))


def materialised_statistics(head, features, targets, domains, num_domains, loss_name):
    """Per domain: diag of the full Hessian of the mean loss, and the per-sample gradients' variance."""
    C, D = head.weight.shape
    theta = torch.cat([head.weight.detach().reshape(-1), head.bias.detach()])

    def split(theta_P):
        return theta_P[: C * D].reshape(C, D), theta_P[C * D :]

    hessians, variances = [], []
    for e in range(num_domains):
        z, y = features[domains == e], targets[domains == e]

        def mean_loss(theta_P, z=z, y=y):
            weight, bias = split(theta_P)
            return domain_loss(loss_name, z @ weight.T + bias, y)

        hessians.append(torch.autograd.functional.hessian(mean_loss, theta).diagonal())
        grads = []
        for i in range(len(z)):
            theta_i = theta.clone().requires_grad_(True)
            weight, bias = split(theta_i)
            grads.append(
                torch.autograd.grad(domain_loss(loss_name, z[i : i + 1] @ weight.T + bias, y[i : i + 1]), theta_i)[0]
            )
        g = torch.stack(grads)
        variances.append(((g - g.mean(0)) ** 2).mean(0))
    return torch.stack(hessians), torch.stack(variances)


@pytest.mark.parametrize("loss_name, num_classes", [("cross_entropy", 3), ("bce_with_logits", 1)])
def test_hessian_diagonal_and_gradient_variance_match_materialised_references(loss_name, num_classes):
    torch.manual_seed(0)
    N, D, E = 30, 4, 3
    features = torch.randn(N, D, dtype=torch.float64)
    domains = torch.arange(N) % E
    if loss_name == "cross_entropy":
        targets = torch.randint(0, num_classes, (N,))
    else:
        targets = torch.randint(0, 2, (N, 1)).double()
    head = nn.Linear(D, num_classes).double()
    hessian_EP, variance_EP = materialised_statistics(head, features, targets, domains, E, loss_name)
    before = [p.detach().clone() for p in head.parameters()]
    torch.testing.assert_close(head_hessian_diagonals(head, features, targets, domains, E, loss_name), hessian_EP)
    torch.testing.assert_close(head_gradient_variances(head, features, targets, domains, E, loss_name), variance_EP)
    # The real head is untouched: same values, no .grad, no BackPACK attributes.
    for p, p0 in zip(head.parameters(), before):
        assert torch.equal(p, p0) and p.grad is None and not hasattr(p, "diag_h")


def test_alignment_metrics_are_the_distances_to_the_mean_and_between_domains():
    hessian = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    variance = torch.tensor([[2.0, 0.0], [2.0, 4.0]])
    metrics = alignment_metrics(hessian, variance)
    # Hessian: mean (2, 2); each domain is at squared distance 1, i.e. 1/8 of ||mean||² = 8.
    assert metrics["hessian_distance/domain_0"] == pytest.approx(1.0)
    assert metrics["hessian_relative_distance/domain_1"] == pytest.approx(1 / 8)
    assert metrics["hessian_pairwise_distance"] == pytest.approx(4.0)  # ||(1,2) − (3,2)||²
    # Gradient variance: mean (2, 2); distances 4 each, relative 4/8, pairwise 16.
    assert metrics["grad_variance_distance/domain_1"] == pytest.approx(4.0)
    assert metrics["grad_variance_relative_distance/domain_0"] == pytest.approx(0.5)
    assert metrics["grad_variance_pairwise_distance"] == pytest.approx(16.0)
    # cos((1,2),(2,0)) = 2/(√5·2); cos((3,2),(2,4)) = 14/(√13·√20).
    assert metrics["cosine_hessian_grad_variance/domain_0"] == pytest.approx(1 / 5**0.5)
    assert metrics["cosine_hessian_grad_variance/domain_1"] == pytest.approx(14 / (13**0.5 * 20**0.5))


# -- the callback in a Trainer -----------------------------------------------------------------


class TwoDomainClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.featurizer = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.classifier = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y, _domain = batch
        return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def two_domain_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y, torch.arange(n) % 2)


def fit(module, callbacks, root):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=CSVLogger(root, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(module, DataLoader(two_domain_data(), batch_size=16))
    return trainer


def test_callback_measures_every_n_steps_without_changing_training(tmp_path):
    torch.manual_seed(0)
    module = TwoDomainClassifier()
    reference_module = copy.deepcopy(module)
    initial = copy.deepcopy(module)
    callback = HessianAlignmentCallback(every_n_steps=2)
    trainer = fit(module, [callback], tmp_path)

    assert [row["step"] for row in callback.history] == [0.0, 2.0, 4.0]
    # Step 0 describes the initial weights on the first batch, against the materialised reference.
    x, y, domains = next(iter(DataLoader(two_domain_data(), batch_size=16)))
    with torch.no_grad():
        features = initial.featurizer(x)
    hessian_EP, variance_EP = materialised_statistics(initial.classifier, features, y, domains, 2, "cross_entropy")
    expected = alignment_metrics(hessian_EP, variance_EP)
    for name, value in expected.items():
        assert callback.history[0][name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
    # Every measurement reaches the logger at its step (not only every log_every_n_steps).
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as metrics_file:
        logged = [row for row in csv.DictReader(metrics_file) if row.get("hessian_alignment/hessian_pairwise_distance")]
    assert [int(row["step"]) for row in logged] == [0, 2, 4]
    assert float(logged[1]["hessian_alignment/grad_variance_relative_distance/domain_1"]) == pytest.approx(
        callback.history[1]["grad_variance_relative_distance/domain_1"], rel=1e-6
    )
    # Training is the same with and without the diagnostics.
    fit(reference_module, [], tmp_path / "plain")
    for p, q in zip(module.parameters(), reference_module.parameters()):
        assert torch.equal(p, q)
    # The plot lands in the logger's directory, as a PNG.
    png = Path(trainer.log_dir) / "hessian_alignment.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The history survives a checkpoint.
    restored = HessianAlignmentCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history


def test_callback_refuses_unsupported_losses_and_missing_domains(tmp_path):
    with pytest.raises(FishrInputError, match="DiagHessian"):
        HessianAlignmentCallback(loss="mse")
    with pytest.raises(FishrInputError, match="every_n_steps"):
        HessianAlignmentCallback(every_n_steps=0)
    with pytest.raises(FishrInputError, match="at least 2 samples of every"):
        fit(TwoDomainClassifier(), [HessianAlignmentCallback(every_n_steps=1, num_domains=3)], tmp_path)


def test_config_instantiates_the_callback():
    from hydra.utils import instantiate

    cfg = OmegaConf.load(ROOT / "configs" / "callbacks" / "hessian_alignment.yaml")
    callback = instantiate(cfg.hessian_alignment)
    assert isinstance(callback, HessianAlignmentCallback)
    assert callback.every_n_steps == 100 and callback.loss == "cross_entropy"


@pytest.mark.skipif(not (ROOT / "configs" / "train.yaml").exists(), reason="the training app's configs are not there")
def test_training_app_composes_plus_callbacks_hessian_alignment():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(
            "train", overrides=["+callbacks=hessian_alignment", "callbacks.hessian_alignment.every_n_steps=7"]
        )
    node = cfg.callbacks.hessian_alignment
    assert node._target_ == "fishr_lightning.diagnostics.hessian_alignment.HessianAlignmentCallback"
    assert node.every_n_steps == 7
