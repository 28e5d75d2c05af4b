"""Fishr with the full covariance of the head's gradients (paper, Table 6), against materialised P×P covariances.

The package never forms a ``P×P`` matrix (``functional.full_covariance_distance`` works on ``N×N`` Gram
matrices); the reference here materialises every per-sample gradient by autograd, one sample at a time,
and each domain's covariance block, in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from test_callback import STEPS, DomainClassifier, MixinClassifier, batches, domain_data, trainer

from fishr_lightning import FishrCallback, FishrInputError, FishrOptions, FishrPenalty
from fishr_lightning import functional as FF


def reference_full_covariance_penalty(
    features_ND,
    targets_N,
    weight,
    bias,
    domains_N,
    num_domains,
    centered=True,
    param_reduction="mean",
    domain_reduction="mean",
):
    """``reduce_e reduce_entries (S_e − S̄)²`` with ``S_e = Ĝ_eᵀĜ_e/(n_e·P_g)`` per parameter tensor, materialised."""
    params = [weight] + ([bias] if bias is not None else [])
    statistics = []  # per domain: the flattened P_g×P_g blocks
    for e in range(num_domains):
        rows = [[] for _ in params]
        for z, y in zip(features_ND[domains_N == e], targets_N[domains_N == e]):
            logits = z @ weight.T + (bias if bias is not None else 0)
            loss = F.cross_entropy(logits[None], y[None])
            for g, grad in enumerate(torch.autograd.grad(loss, params, create_graph=True)):
                rows[g].append(grad.reshape(-1))
        blocks = []
        for group_rows in rows:
            grads_nP = torch.stack(group_rows)
            if centered:
                grads_nP = grads_nP - grads_nP.mean(dim=0, keepdim=True)
            covariance_PP = grads_nP.T @ grads_nP / grads_nP.shape[0]
            blocks.append((covariance_PP / covariance_PP.shape[0]).reshape(-1))
        statistics.append(torch.cat(blocks))
    statistic_EX = torch.stack(statistics)
    gaps_EX = (statistic_EX - statistic_EX.mean(dim=0)).square()
    per_domain_E = gaps_EX.mean(dim=1) if param_reduction == "mean" else gaps_EX.sum(dim=1)
    return per_domain_E.mean() if domain_reduction == "mean" else per_domain_E.sum()


@pytest.mark.parametrize(
    "centered, has_bias, param_reduction, domain_reduction, D, C, route",
    [
        (True, True, "mean", "mean", 5, 4, "grams"),  # a head larger than the batch: N×N Grams
        (False, True, "sum", "mean", 5, 4, "grams"),
        (True, False, "mean", "sum", 5, 4, "grams"),
        (True, True, "mean", "mean", 2, 2, "covariances"),  # a batch larger than the head: P_g×P_g
    ],
)
def test_full_covariance_penalty_and_its_gradient_equal_the_materialised_covariances(
    centered, has_bias, param_reduction, domain_reduction, D, C, route
):
    torch.manual_seed(0)
    N, E = 19, 3
    assert FF.full_covariance_route(N, [C * D] + ([C] if has_bias else []), E) == route
    features = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (N,))
    domains = torch.tensor([0] * 6 + [1] * 8 + [2] * 5)[torch.randperm(N)]  # unequal, interleaved
    head = torch.nn.Linear(D, C, bias=has_bias).double()
    penalty = FishrPenalty(
        num_domains=E,
        ema=0.0,
        covariance="full",
        centered=centered,
        param_reduction=param_reduction,
        domain_reduction=domain_reduction,
    )
    value = penalty(features, head(features), targets, domains, head=head)
    expected = reference_full_covariance_penalty(
        features, targets, head.weight, head.bias, domains, E, centered, param_reduction, domain_reduction
    )
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    inputs = [features, head.weight] + ([head.bias] if has_bias else [])
    for got, want in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_gram_of_the_factors_is_the_gram_of_the_materialised_gradients():
    torch.manual_seed(1)
    features, delta = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    grads_NP = FF.closed_form_per_sample_gradients(features, delta)
    for got, want in zip(FF.head_gradient_grams(features, delta), FF.per_sample_gradient_grams(grads_NP, [12, 3])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_full_covariance_refuses_an_ema_and_distributed_training_clearly():
    with pytest.raises(FishrInputError, match=r"covariance='full' needs ema=0.*Table 6"):
        FishrCallback(covariance="full")  # the default ema=0.95
    with pytest.raises(FishrInputError, match="covariance must be"):
        FishrOptions(covariance="offdiagonal", ema=0.0)
    penalty = FishrPenalty(num_domains=2, ema=0.0, covariance="full", reduce_moments=lambda m: m)
    with pytest.raises(FishrInputError, match="all-gathered"):
        penalty(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))


def hand_written_fit(dataset, penalty_weight, warmup_steps, lr, reductions):
    """SGD on ``loss + λ_t · P`` with the materialised reference penalty, λ_t = 0 during warm-up."""
    model = DomainClassifier(lr=lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step, (x, y, domains) in enumerate(batches(dataset)):
        features = model.featurizer(x)
        loss = F.cross_entropy(model.classifier(features), y)
        if step >= warmup_steps and penalty_weight > 0:
            head = model.classifier
            loss = loss + penalty_weight * reference_full_covariance_penalty(
                features, y, head.weight, head.bias, domains, 3, True, *reductions
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert step + 1 == STEPS
    return model


def test_fit_with_full_covariance_logs_and_ends_on_the_hand_written_loops_weights():
    dataset, penalty_weight, warmup_steps, lr, reductions = domain_data(), 1000.0, 2, 0.1, ("sum", "sum")
    options = dict(
        penalty_weight=penalty_weight,
        warmup_steps=warmup_steps,
        ema=0.0,
        covariance="full",
        param_reduction=reductions[0],
        domain_reduction=reductions[1],
    )
    model = DomainClassifier(lr=lr)
    fit = trainer(callbacks=[FishrCallback(**options)])
    fit.fit(model, batches(dataset))
    assert fit.callback_metrics["fishr/weight"].item() == penalty_weight
    assert fit.callback_metrics["fishr/penalty"].item() > 0

    by_hand = hand_written_fit(dataset, penalty_weight, warmup_steps, lr, reductions)
    for got, want in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with_mixin = MixinClassifier(lr=lr, **options)  # FishrMixin takes the same option
    trainer().fit(with_mixin, batches(dataset))
    for got, want in zip(with_mixin.parameters(), by_hand.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The penalty moved the backbone: the equality above is not ERM's weights on both sides.
    without_penalty = hand_written_fit(dataset, 0.0, warmup_steps, lr, reductions)
    assert (model.featurizer[0].weight - without_penalty.featurizer[0].weight).abs().max() > 1e-2
