"""The comparison set's maths equals DomainBed's formulas (tests/baselines_reference.py) in value and
gradient, on batches whose domains are interleaved and of unequal sizes."""

import baselines_reference as ref
import pytest
import torch
import torch.nn.functional as F

from fishr_lightning import FishrInputError
from fishr_lightning.baselines import functional as BF

E, N, D, C = 3, 23, 5, 4


@pytest.fixture
def step():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (N,), generator=g)
    domains = torch.randint(0, E, (N,), generator=g)
    domains[:E] = torch.arange(E)  # every domain present, in a shuffled batch
    return features, logits, targets, domains


def per_domain(tensor, domains):
    return [tensor[domains == e] for e in range(E)]


def assert_same_value_and_gradient(ours, reference, inputs):
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_irm_penalty_is_domainbeds_interleaved_halves(step):
    _, logits, targets, domains = step
    ours = BF.irm_penalty(logits, targets, domains, E)
    reference = sum(ref.irm_penalty(z, y) for z, y in zip(per_domain(logits, domains), per_domain(targets, domains)))
    assert_same_value_and_gradient(ours, reference / E, [logits])


def as_two_ranks(penalty, split, **rank1_options):
    """``penalty(rows, reduce=...)`` as two data-parallel ranks holding ``rows[:split]`` and ``rows[split:]``:
    rank 1's sums are recorded, then added to rank 0's by a stand-in for the all-reduce (one collective)."""
    recorded = []
    penalty(slice(split, None), reduce=lambda t: recorded.append(t.detach()) or t, **rank1_options)
    return penalty(slice(0, split), reduce=lambda t: t + recorded[0])


def test_irm_under_data_parallel_uses_the_global_batchs_halves(step):
    _, logits, targets, domains = step
    split = 11
    offset_E = torch.stack([(domains[:split] == e).sum() for e in range(E)])  # rank 0's samples of each domain

    def penalty(rows, **options):
        return BF.irm_penalty(logits[rows], targets[rows], domains[rows], E, **options)

    reference = sum(ref.irm_penalty(z, y) for z, y in zip(per_domain(logits, domains), per_domain(targets, domains)))
    torch.testing.assert_close(
        as_two_ranks(penalty, split, position_offset_E=offset_E), reference / E, rtol=1e-12, atol=1e-14
    )


def test_vrex_and_sd_under_data_parallel_are_the_global_batchs(step):
    _, logits, targets, domains = step
    loss_N = F.cross_entropy(logits, targets, reduction="none")

    def vrex(rows, **options):
        return BF.vrex_penalty(BF.domain_mean_losses(loss_N[rows], domains[rows], E, **options))

    def sd(rows, **options):
        return BF.spectral_decoupling_penalty(logits[rows], **options)

    torch.testing.assert_close(as_two_ranks(vrex, 9), BF.vrex_penalty(BF.domain_mean_losses(loss_N, domains, E)))
    torch.testing.assert_close(as_two_ranks(sd, 9), (logits**2).mean())


def test_vrex_penalty_is_the_variance_of_the_domains_mean_losses(step):
    _, logits, targets, domains = step
    losses_E = BF.domain_mean_losses(F.cross_entropy(logits, targets, reduction="none"), domains, E)
    reference = torch.stack(
        [F.cross_entropy(z, y) for z, y in zip(per_domain(logits, domains), per_domain(targets, domains))]
    )
    torch.testing.assert_close(losses_E, reference, rtol=1e-12, atol=0)
    assert_same_value_and_gradient(BF.vrex_penalty(losses_E), ((reference - reference.mean()) ** 2).mean(), [logits])


@pytest.mark.parametrize("gaussian", [False, True], ids=["coral", "mmd"])
def test_feature_alignment_is_domainbeds_pairwise_average(step, gaussian):
    features, _, _, domains = step
    ours = BF.mmd_penalty(features, domains, E) if gaussian else BF.coral_penalty(features, domains, E)
    assert_same_value_and_gradient(ours, ref.pairwise_mmd(per_domain(features, domains), gaussian), [features])


def test_groupdro_weights_and_objective(step):
    _, logits, targets, domains = step
    losses_E = BF.domain_mean_losses(F.cross_entropy(logits, targets, reduction="none"), domains, E)
    q = torch.ones(E, dtype=torch.float64)
    expected_q = q.clone()
    for m in range(E):
        expected_q[m] *= (0.1 * losses_E[m].detach()).exp()
    expected_q /= expected_q.sum()
    q = BF.groupdro_update(q, losses_E, eta=0.1)
    assert not q.requires_grad
    torch.testing.assert_close(q, expected_q, rtol=1e-14, atol=0)
    reference = torch.stack(
        [F.cross_entropy(z, y) for z, y in zip(per_domain(logits, domains), per_domain(targets, domains))]
    )
    assert_same_value_and_gradient(BF.groupdro_objective(q, losses_E), torch.dot(reference, expected_q), [logits])


def test_spectral_decoupling_is_the_mean_squared_logit(step):
    _, logits, _, _ = step
    assert_same_value_and_gradient(BF.spectral_decoupling_penalty(logits), (logits**2).mean(), [logits])


def test_mixup_pairs_follow_domainbeds_permutation():
    g = torch.Generator().manual_seed(3)
    pairs = BF.random_domain_pairs(4, g)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3)).tolist()
    minibatches = [(torch.full((2 + e, 1), float(e)), torch.full((2 + e,), e)) for e in range(4)]
    expected = ref.random_pairs_of_minibatches(minibatches, perm)
    for (i, j), ((xi, yi), (xj, yj)) in zip(pairs, expected):
        assert (yi[0].item(), yj[0].item()) == (i, j)
        mixed, n = BF.mixup_inputs(minibatches[i][0], minibatches[j][0], 0.3)
        assert n == len(xi) == min(2 + i, 2 + j)
        torch.testing.assert_close(mixed, 0.3 * xi + 0.7 * xj)


def test_a_missing_domain_is_refused_with_what_to_do(step):
    features, logits, targets, domains = step
    with pytest.raises(FishrInputError, match="every training domain"):
        BF.coral_penalty(features, domains, E + 1)
    # One training domain is no missing domain: no pairs, penalty 0 (DomainBed's `if nmb > 1`, issue 25).
    for penalty in (BF.mmd_penalty, BF.coral_penalty):
        zero = penalty(features, torch.zeros_like(domains), 1)
        assert zero.item() == 0.0 and torch.autograd.grad(zero, features)[0].count_nonzero() == 0


def test_the_pairwise_identity_equals_the_pairs_written_out():
    values = torch.randn(4, 3, 5, dtype=torch.float64)
    pairs = [((values[i] - values[j]) ** 2).mean() for i in range(4) for j in range(i + 1, 4)]
    torch.testing.assert_close(
        BF.mean_pairwise_squared_distance(list(values)), torch.stack(pairs).mean(), rtol=1e-13, atol=0
    )
