"""Property-based: for random sizes, domain assignments and options, the closed form equals the
materialised per-sample reference (``fishr_reference``) in float64."""

import fishr_reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fishr_lightning import FishrPenalty


@st.composite
def problems(draw):
    num_domains = draw(st.integers(1, 4))
    per_domain = draw(st.lists(st.integers(2, 6), min_size=num_domains, max_size=num_domains))
    domains_N = torch.tensor([e for e, n in enumerate(per_domain) for _ in range(n)])
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    domains_N = domains_N[torch.randperm(len(domains_N), generator=g)]
    return dict(
        num_domains=num_domains,
        domains_N=domains_N,
        num_classes=draw(st.integers(1, 5)),
        num_features=draw(st.integers(1, 6)),
        loss=draw(st.sampled_from(["cross_entropy", "bce_with_logits"])),
        centered=draw(st.booleans()),
        bias=draw(st.booleans()),
        generator=g,
    )


def reference_loss(loss):
    if loss == "cross_entropy":
        return lambda logits, y: F.cross_entropy(logits, y, reduction="sum")
    return lambda logits, y: F.binary_cross_entropy_with_logits(
        logits, y.to(logits.dtype).reshape(logits.shape), reduction="sum"
    )


@settings(max_examples=40, deadline=None)
@given(problems())
def test_closed_form_penalty_and_gradient_equal_the_materialised_reference(problem):
    g, N = problem["generator"], len(problem["domains_N"])
    C, D, E = problem["num_classes"], problem["num_features"], problem["num_domains"]
    if problem["loss"] == "cross_entropy" and C == 1:
        C = 2  # one-class softmax has zero gradients
    head = nn.Linear(D, C, bias=problem["bias"]).double()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    features = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    if problem["loss"] == "cross_entropy":
        targets = torch.randint(0, C, (N,), generator=g)
    else:
        targets = torch.randint(0, 2, (N, C), generator=g).double()
    domains = problem["domains_N"]

    penalty = FishrPenalty(num_domains=E, ema=0.0, centered=problem["centered"], loss=problem["loss"])
    value = penalty(features, head(features), targets, domains, head=head)
    grads_NP = ref.per_sample_head_gradients(head, features, targets, reference_loss(problem["loss"]))
    expected = ref.distance(ref.domain_variances(grads_NP, domains, E, problem["centered"]))
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)

    params = [features, *head.parameters()]
    for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
