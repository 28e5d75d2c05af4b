"""The paper's Colored MNIST experiment (issue 5): data, penalties, schedule, and an end-to-end run.

The Fishr penalties are checked against an independent reference written here from the formulas of
the paper's script (alexrame/fishr, ``coloredmnist/train_coloredmnist.py``): per-sample gradients of
the head materialised one sample at a time, per-environment variance (or covariance matrix per
parameter tensor, divided by ``n_e · P_g``), summed squared distance to the environments' mean, summed
over the two environments.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_factories import synthetic_digits, write_mnist

from fishr_lightning import FishrInputError, FishrPenalty
from fishr_lightning import functional as FF

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "colored_mnist_irm.py"


def load_example():
    spec = importlib.util.spec_from_file_location("colored_mnist_irm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["colored_mnist_irm"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


cm = load_example()


# -- data construction -------------------------------------------------------------------------


def test_environment_label_noise_and_colour_rates_match_the_setup():
    images, digits = (torch.from_numpy(a) for a in synthetic_digits(20_000, seed=3))
    generator = torch.Generator().manual_seed(0)
    clean_labels = (digits < 5).float()
    for color_flip in (0.2, 0.1, 0.9):
        env = cm.make_environment(images, digits, color_flip, 0.25, generator)
        labels = env.labels_N1[:, 0]
        # 4 standard deviations of a rate estimated on 20,000 draws are at most 0.0123.
        assert (labels != clean_labels).float().mean().item() == pytest.approx(0.25, abs=0.0125)
        assert (env.colors_N != labels).float().mean().item() == pytest.approx(color_flip, abs=0.0125)
        # The digit sits in channel `color` only, at 14×14, scaled to [0, 1].
        assert env.images_NCHW.shape == (20_000, 2, 14, 14)
        expected_NHW = images[:, ::2, ::2].float() / 255
        channel = env.colors_N.long()
        rows = torch.arange(20_000)
        torch.testing.assert_close(env.images_NCHW[rows, channel], expected_NHW)
        assert env.images_NCHW[rows, 1 - channel].abs().max() == 0


def test_grayscale_environment_keeps_both_channels():
    images, digits = (torch.from_numpy(a) for a in synthetic_digits(500, seed=4))
    env = cm.make_environment(images, digits, 0.9, 0.25, torch.Generator().manual_seed(0), grayscale=True)
    torch.testing.assert_close(env.images_NCHW[:, 0], env.images_NCHW[:, 1])
    torch.testing.assert_close(env.images_NCHW[:, 0], images[:, ::2, ::2].float() / 255)


def test_environments_split_first_num_train_into_two_halves_and_test_on_the_rest():
    images, digits = (torch.from_numpy(a) for a in synthetic_digits(1_300, seed=5))
    # Mark each image by its index in a pixel the 2× subsampling keeps, to follow it through the shuffle.
    marked = images.clone()
    marked[:, 0, 0] = torch.arange(1_300) % 256
    marked[:, 0, 2] = torch.arange(1_300) // 256
    setup = cm.IRMSetup(num_train=1_000)
    envs = cm.make_environments(marked, digits, setup, torch.Generator().manual_seed(1))
    assert {name: len(env.labels_N1) for name, env in envs.items()} == {
        "train_0": 500,
        "train_1": 500,
        "test": 300,
        "test_gray": 300,
    }

    def indices(env):
        pixels = (env.images_NCHW.amax(dim=1) * 255).round().long()
        return (pixels[:, 0, 0] + 256 * pixels[:, 0, 1]).tolist()

    train_indices = indices(envs["train_0"]) + indices(envs["train_1"])
    assert sorted(train_indices) == list(range(1_000))  # the first 1,000, each once
    assert train_indices != list(range(1_000))  # shuffled
    assert indices(envs["test"]) == list(range(1_000, 1_300))  # the rest, in order
    # The same generator seed gives the same environments.
    again = cm.make_environments(marked, digits, setup, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["train_1"].labels_N1, envs["train_1"].labels_N1)


# -- model, schedule, IRM and V-REx ------------------------------------------------------------


def test_mlp_is_392_390_390_1_with_xavier_weights_and_zero_biases():
    model = cm.MLP(generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(392, 390), (390, 390), (390, 1)]
    for m in linears:
        bound = math.sqrt(6 / (m.in_features + m.out_features))
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
        assert m.bias.abs().max() == 0
    features, logits = model(torch.rand(5, 2, 14, 14))
    assert features.shape == (5, 390) and logits.shape == (5, 1)
    gray = cm.MLP(grayscale_model=True)
    assert gray.featurizer[0].in_features == 196
    x = torch.rand(3, 2, 14, 14)
    torch.testing.assert_close(gray(x)[1], gray(x.flip(1))[1])  # sees only the sum of the channels


def test_penalty_weight_schedule_and_loss_division():
    setup = cm.IRMSetup()
    nll, norm, penalty = torch.tensor(0.5), torch.tensor(10.0), torch.tensor(2.0)
    l2 = 0.00110794568
    assert cm.training_objective(nll, norm, None, 400, setup).item() == pytest.approx(0.5 + l2 * 10)
    assert cm.training_objective(nll, norm, penalty, 189, setup).item() == pytest.approx(0.5 + l2 * 10 + 2.0)
    lam = 91257.18613115903
    expected = (0.5 + l2 * 10 + lam * 2.0) / lam
    assert cm.training_objective(nll, norm, penalty, 190, setup).item() == pytest.approx(expected, rel=1e-6)


def test_irm_penalty_is_the_squared_derivative_of_the_risk_wrt_a_logit_scale():
    logits = torch.randn(50, 1, dtype=torch.float64)
    labels = torch.randint(0, 2, (50, 1)).double()
    # d/ds mean BCE(s·l, y) at s = 1 is mean((σ(l) − y)·l).
    expected = ((logits.sigmoid() - labels) * logits).mean().square()
    torch.testing.assert_close(cm.irm_penalty(logits, labels), expected)
    torch.testing.assert_close(cm.vrex_penalty(torch.tensor(0.7), torch.tensor(0.4)), torch.tensor(0.09))


# -- Fishr options against the paper script's formulas ------------------------------------------


def script_fishr_penalty(features_ND, labels_N1, weight, bias, domains_N, variant):
    """The paper's Colored MNIST Fishr penalty, from its formulas, with materialised gradients."""
    variances = []
    for e in (0, 1):
        grads = {"weight": [], "bias": []}
        for z, y in zip(features_ND[domains_N == e], labels_N1[domains_N == e]):
            loss = F.binary_cross_entropy_with_logits(z @ weight.T + bias, y)
            g_weight, g_bias = torch.autograd.grad(loss, (weight, bias), create_graph=True)
            grads["weight"].append(g_weight.reshape(-1))
            grads["bias"].append(g_bias.reshape(-1))
        variance = {}
        for name, rows in grads.items():
            g = torch.stack(rows)  # [n_e, P_group]
            if variant != "fishr_uncentered":
                g = g - g.mean(dim=0, keepdim=True)
            if variant == "fishr_full_covariance":
                variance[name] = torch.einsum("na,nb->ab", g, g) / (g.shape[0] * g.shape[1])
            else:
                variance[name] = g.square().mean(dim=0)
        variances.append(torch.cat([variance[k].reshape(-1) for k in sorted(variance)]))
    mean = (variances[0] + variances[1]) / 2
    return (variances[0] - mean).square().sum() + (variances[1] - mean).square().sum()


@pytest.mark.parametrize("variant", ["fishr", "fishr_uncentered", "fishr_full_covariance"])
@pytest.mark.parametrize("backend", ["closed_form", "backpack"])
def test_fishr_penalties_equal_the_paper_script_in_value_and_gradient(variant, backend):
    torch.manual_seed(0)
    N, D = 23, 6
    features = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (N, 1)).double()
    domains = torch.tensor([0] * 11 + [1] * 12)[torch.randperm(N)]
    head = torch.nn.Linear(D, 1).double()
    if backend == "backpack":
        from backpack import extend

        extend(head)
    penalty = cm.fishr_penalty(variant)
    penalty.backend = backend
    value = penalty(features, head(features), labels, domains, head=head)
    expected = script_fishr_penalty(features, labels, head.weight, head.bias, domains, variant)
    torch.testing.assert_close(value, expected)
    # Its gradient reaches the features (the backbone) and the head, as the script's does.
    inputs = (features, head.weight, head.bias)
    for got, want in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want)


def test_fishr_penalty_options_are_the_setups():
    penalty = cm.fishr_penalty("fishr")
    assert (penalty.num_domains, penalty.ema, penalty.centered, penalty.covariance) == (2, 0.0, True, "diagonal")
    assert (penalty.param_reduction, penalty.domain_reduction, penalty.loss) == ("sum", "sum", "bce_with_logits")
    assert cm.fishr_penalty("fishr_uncentered").centered is False
    assert cm.fishr_penalty("fishr_full_covariance").covariance == "full"


def test_covariance_diagonal_is_the_core_variance_and_blocks_stay_per_group():
    torch.manual_seed(1)
    grads = torch.randn(30, 7, dtype=torch.float64)
    domains = torch.randint(0, 3, (30,))
    domains[:3] = torch.tensor([0, 1, 2])
    for centered in (True, False):
        weight_EGG, bias_EGG = FF.domain_gradient_covariance(grads, domains, 3, [5, 2], centered=centered)
        assert weight_EGG.shape == (3, 5, 5) and bias_EGG.shape == (3, 2, 2)
        variance = FF.domain_gradient_variance(FF.per_sample_moments(grads, domains, 3), centered=centered)
        diagonal = torch.cat([weight_EGG.diagonal(dim1=1, dim2=2), bias_EGG.diagonal(dim1=1, dim2=2)], dim=1)
        torch.testing.assert_close(diagonal, variance)
        g = grads[domains == 2][:, :5]
        g = g - g.mean(0) if centered else g
        torch.testing.assert_close(weight_EGG[2], g.T @ g / len(g))
    with pytest.raises(FishrInputError, match="group_sizes"):
        FF.domain_gradient_covariance(grads, domains, 3, [5, 1])


def test_full_covariance_refuses_bad_options_clearly():
    with pytest.raises(FishrInputError, match="covariance must be"):
        FishrPenalty(covariance="offdiagonal")
    penalty = FishrPenalty(num_domains=2, ema=0.0, covariance="full", reduce_moments=lambda m: m)
    with pytest.raises(FishrInputError, match="distributed"):
        penalty(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))


# -- end to end ---------------------------------------------------------------------------------


def test_reduced_run_prints_the_table_for_every_algorithm(tmp_path, capsys):
    write_mnist(tmp_path, n_train=700, n_test=10)
    argv = [
        "--data-dir",
        str(tmp_path),
        "--num-train",
        "600",
        "--restarts",
        "1",
        "--steps",
        "2",
        "--algorithms",
        "all",
        "--log-every",
        "0",
        "--device",
        "cpu",
    ]
    results = cm.main(argv)
    out = capsys.readouterr().out
    assert "1 restart(s) × 2 steps, 600 training / 100 test images" in out
    for algorithm in cm.ALGORITHMS:
        row = re.search(rf"^{algorithm}\s+(.*)$", out, flags=re.MULTILINE)
        assert row, f"no table row for {algorithm}:\n{out}"
        cells = re.findall(r"(\d+\.\d) ± (\d+\.\d)", row.group(1))
        assert len(cells) == 3
        runs = results[algorithm]
        for (mean, std), values in zip(
            cells, ([r.train_acc for r in runs], [r.test_acc for r in runs], [r.gray_test_acc for r in runs])
        ):
            assert float(mean) == pytest.approx(100 * np.mean(values), abs=0.051)
            assert float(std) == pytest.approx(100 * np.std(values), abs=0.051)
    assert "71.0 / 69.5 / 70.2" in out  # the paper's Fishr row next to ours
    # Every algorithm saw the same data and initialisation: after 2 steps at λ = 1 they barely differ.
    assert results["erm"][0].test_acc == pytest.approx(results["fishr"][0].test_acc, abs=0.05)


def test_missing_mnist_says_where_to_put_it(tmp_path):
    with pytest.raises(SystemExit, match=r"--download.*MNIST/raw|MNIST.raw.*--download"):
        cm.main(["--data-dir", str(tmp_path / "nowhere"), "--restarts", "1", "--steps", "1"])


def test_too_small_a_training_set_is_refused_with_what_to_pass(tmp_path):
    write_mnist(tmp_path, n_train=100, n_test=10)
    with pytest.raises(SystemExit, match="--num-train below 100"):
        cm.main(["--data-dir", str(tmp_path), "--restarts", "1", "--steps", "1"])
