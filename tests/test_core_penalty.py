"""The pure-torch core equals DomainBed's Fishr, computed the slow way in ``fishr_reference``."""

import fishr_reference as ref
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishr_lightning import FishrInputError, FishrPenalty, penalty_weight_at_step
from fishr_lightning import functional as FF

N, D, C, E = 18, 5, 4, 3


def make_batch(seed=0, n=N, d=D, c=C, e=E, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, c, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, d, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    features = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, c, (n,), generator=g)
    domains = torch.randperm(n, generator=g) % e  # interleaved, not in blocks
    return head, features, targets, domains


def closed_form_variance(head, features, targets, domains, centered=True, loss="cross_entropy"):
    delta = FF.logit_gradients(head(features), targets, loss)
    moments = FF.closed_form_moments(features, delta, domains, E, bias=head.bias is not None)
    return FF.domain_gradient_variance(moments, centered=centered)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_variance_equals_materialised_per_sample_gradients(centered, bias):
    head, features, targets, domains = make_batch(bias=bias)
    expected = ref.domain_variances(ref.per_sample_head_gradients(head, features, targets), domains, E, centered)
    variance_EP = closed_form_variance(head, features, targets, domains, centered)
    assert variance_EP.shape == (E, C * D + (C if bias else 0))
    torch.testing.assert_close(variance_EP, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_backpack_backend_agrees_with_closed_form_to_1e_6_relative():
    from backpack import extend

    head, features, targets, domains = make_batch(n=40, d=16, c=7)
    extend(head)
    logits = head(features)
    grads_NP = FF.backpack_per_sample_gradients(head, features, targets, "cross_entropy")
    backpack_EP = FF.domain_gradient_variance(FF.per_sample_moments(grads_NP, domains, E))
    delta = FF.logit_gradients(logits, targets)
    closed_form_EP = FF.domain_gradient_variance(FF.closed_form_moments(features, delta, domains, E))
    relative_error = (backpack_EP - closed_form_EP).abs().max() / closed_form_EP.abs().max()
    assert relative_error < 1e-6
    assert head.weight.grad is None and features.grad is None, "the BackPACK pass must not touch .grad"


def test_any_per_sample_loss_goes_through_autograd_on_the_logits():
    def smoothed_ce(logits, y):
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)

    head, features, targets, domains = make_batch()
    grads = ref.per_sample_head_gradients(
        head, features, targets, lambda s, y: F.cross_entropy(s, y, reduction="sum", label_smoothing=0.1)
    )
    expected = torch.stack(ref.domain_variances(grads, domains, E))
    torch.testing.assert_close(closed_form_variance(head, features, targets, domains, loss=smoothed_ce), expected)


def test_bce_one_logit_head():
    head, features, _, domains = make_batch(c=1)
    targets = (torch.rand(N, generator=torch.Generator().manual_seed(3)) < 0.5).double()[:, None]
    bce = lambda s, y: F.binary_cross_entropy_with_logits(s, y, reduction="sum")
    expected = torch.stack(
        ref.domain_variances(ref.per_sample_head_gradients(head, features, targets, bce), domains, E)
    )
    torch.testing.assert_close(closed_form_variance(head, features, targets, domains, loss="bce_with_logits"), expected)


@pytest.mark.parametrize("backend", ["closed_form", "backpack"])
def test_penalty_over_steps_equals_domainbed_value_and_gradient(backend):
    """Three steps of EMA'd penalty: values, and gradients w.r.t. features and head, as DomainBed."""
    from backpack import extend

    penalty = FishrPenalty(num_domains=E, ema=0.9, backend=backend)
    reference = ref.ReferenceFishr(num_domains=E, ema=0.9)
    for step in range(3):
        head, features, targets, domains = make_batch(seed=step)
        if backend == "backpack":
            extend(head)
        ours = penalty(features, head(features), targets, domains, head=head)
        expected = reference(head, features, targets, domains)
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=0)
        params = [features, head.weight, head.bias]
        for g_ours, g_ref in zip(torch.autograd.grad(ours, params), torch.autograd.grad(expected, params)):
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)
    assert penalty.num_updates == 3


@pytest.mark.parametrize("param_reduction", ["mean", "sum"])
@pytest.mark.parametrize("domain_reduction", ["mean", "sum"])
def test_reduction_options(param_reduction, domain_reduction):
    head, features, targets, domains = make_batch()
    penalty = FishrPenalty(num_domains=E, ema=0.0, param_reduction=param_reduction, domain_reduction=domain_reduction)
    variances = ref.domain_variances(ref.per_sample_head_gradients(head, features, targets), domains, E)
    expected = ref.distance(variances, param_reduction, domain_reduction)
    torch.testing.assert_close(penalty(features, head(features), targets, domains), expected)


def test_gradcheck_of_the_penalty_in_float64():
    head, features, targets, domains = make_batch(n=9, d=3, c=3)

    def penalty_of(features_ND, weight_CD, bias_C):
        logits = features_ND @ weight_CD.T + bias_C
        return FishrPenalty(num_domains=E, ema=0.0)(features_ND, logits, targets, domains)

    inputs = (features, head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(penalty_of, inputs)
    assert torch.autograd.gradgradcheck(penalty_of, inputs)


def test_first_ema_update_uses_the_raw_variance_and_the_state_is_detached():
    variance_EP = torch.rand(E, 6, dtype=torch.float64, requires_grad=True)
    state_EP, smoothed_EP = FF.ema_update(None, variance_EP, decay=0.95)
    torch.testing.assert_close(smoothed_EP, variance_EP)
    assert not state_EP.requires_grad and smoothed_EP.requires_grad
    _, second_EP = FF.ema_update(state_EP, 2 * variance_EP.detach(), decay=0.95)
    torch.testing.assert_close(second_EP, (0.95 * 0.05 * variance_EP + 0.05 * 2 * variance_EP).detach() / 0.05)


def test_half_precision_inputs_are_computed_in_float32():
    head, features, targets, domains = make_batch(dtype=torch.float32)
    logits = head(features)
    expected = FishrPenalty(num_domains=E, ema=0.0)(
        features.bfloat16().float(), logits.bfloat16().float(), targets, domains
    )
    value = FishrPenalty(num_domains=E, ema=0.0)(features.bfloat16(), logits.bfloat16(), targets, domains)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected)


def test_state_dict_round_trip_continues_identically():
    first = FishrPenalty(num_domains=E, ema=0.95)
    head, features, targets, domains = make_batch(seed=0)
    first(features, head(features), targets, domains)
    second = FishrPenalty(num_domains=E, ema=0.95)
    second.load_state_dict(first.state_dict())
    head, features, targets, domains = make_batch(seed=1)
    torch.testing.assert_close(
        first(features, head(features), targets, domains), second(features, head(features), targets, domains)
    )


def test_schedule_warmup_then_weight_or_linear_ramp():
    assert [penalty_weight_at_step(t, 1000.0, 3) for t in range(5)] == [0, 0, 0, 1000.0, 1000.0]
    assert [penalty_weight_at_step(t, 100.0, 2, ramp_steps=4) for t in range(8)] == [0, 0, 25, 50, 75, 100, 100, 100]


# -- bad input: a clear error, never a NaN or a dropped domain ------------------------------------


def test_a_domain_missing_from_the_batch_is_an_error_naming_it():
    head, features, targets, _ = make_batch()
    domains = torch.arange(N) % 2  # domain 2 never occurs
    with pytest.raises(FishrInputError, match=r"domain\(s\) \[2\] have \[0\] sample"):
        FishrPenalty(num_domains=3)(features, head(features), targets, domains)


def test_a_domain_with_one_sample_is_an_error():
    head, features, targets, _ = make_batch()
    domains = torch.zeros(N, dtype=torch.long)
    domains[0], domains[1:4] = 1, 2
    with pytest.raises(FishrInputError, match=r"at least 2 samples"):
        FishrPenalty(num_domains=3)(features, head(features), targets, domains)


def test_domain_ids_out_of_range_or_not_integers():
    head, features, targets, domains = make_batch()
    with pytest.raises(FishrInputError, match=r"Domain id 3 is outside \[0, 3\)"):
        FishrPenalty(num_domains=3)(features, head(features), targets, domains + 1)
    with pytest.raises(FishrInputError, match="integer tensor"):
        FishrPenalty(num_domains=3)(features, head(features), targets, domains.double())


def test_features_with_extra_dimensions_are_refused():
    head = nn.Linear(D, C)
    features = torch.randn(4, 6, D)
    domains = torch.tensor([0, 0, 1, 1])
    with pytest.raises(FishrInputError, match=r"one feature vector per sample, \[N, D\]"):
        FishrPenalty(num_domains=2)(features, head(features), torch.zeros(4, 6, dtype=torch.long), domains)


def test_non_finite_penalty_is_an_error_not_a_silent_nan():
    head, features, targets, domains = make_batch()
    features = features.detach().clone()
    features[0, 0] = float("nan")
    with pytest.raises(FishrInputError, match="penalty is nan"):
        FishrPenalty(num_domains=E)(features, head(features), targets, domains)


def test_invalid_options_are_refused_at_construction():
    with pytest.raises(FishrInputError, match=r"ema must be in \[0, 1\)"):
        FishrPenalty(ema=1.0)
    with pytest.raises(FishrInputError, match="Unknown backend"):
        FishrPenalty(backend="jax")
    with pytest.raises(FishrInputError, match="param_reduction must be"):
        FishrPenalty(param_reduction="max")


def test_the_core_is_pure_torch():
    """The maths and its state import no Lightning (the layers: core → Lightning → app)."""
    import subprocess
    import sys

    check = (
        "import sys, fishr_lightning.penalty, fishr_lightning.schedule, fishr_lightning.distributed, "
        "fishr_lightning.heads; from fishr_lightning import FishrSchedule, penalty_weight_at_step; "
        "assert 'lightning' not in sys.modules, sorted(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, check=False).returncode == 0
