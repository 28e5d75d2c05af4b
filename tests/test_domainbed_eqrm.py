"""EQRM (issue 27) equals DomainBed's ``EQRM.update`` written here from its code (``misc.Nonparametric`` with its
kernel density estimate and bisection): ERM during the burn-in, the quantile of the risks after it, Adam
re-created with ``eqrm_lr`` at its end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import (
    NUM_CLASSES,
    NUM_DOMAINS,
    TinyFeaturizer,
    domain_batches,
    fit,
    float64_state,
    minibatches_of,
)

from fishr_lightning.domainbed import build_algorithm, default_hparams, domainbed_state_dict
from fishr_lightning.domainbed.hparams_registry import hparams_for

HPARAMS = {**default_hparams("EQRM", "PACS"), "lr": 1e-2, "eqrm_burnin_iters": 1, "eqrm_lr": 3e-3, "eqrm_quantile": 0.8}


def nonparametric_icdf(risks, q):  # DomainBed's misc.Nonparametric (use_kde, Gauss-optimal) .icdf(q), q >= 0
    data, _ = torch.sort(risks)
    bw = 1.06 * torch.std(data, unbiased=True) * len(data) ** -0.2
    bws = torch.ones(1) * bw
    lo = torch.distributions.Normal(data[0], bws[0]).icdf(q)
    hi = torch.distributions.Normal(data[-1], bws[-1]).icdf(q)

    def cdf(k):  # KernelDensityEstimator.cdf
        sigmas = torch.ones(len(data)) * bw
        return torch.mean(torch.distributions.Normal(data, sigmas).cdf(k.repeat(len(data), 1).T))

    val_range = [lo, hi]  # misc.continuous_bisect_fun_left
    k = 0.5 * sum(val_range)
    for _ in range(32):
        val_range[int(cdf(k) > q)] = k
        next_k = 0.5 * sum(val_range)
        if next_k == k:
            break
        k = next_k
    return k


def test_k_updates_end_on_domainbeds_weights():
    torch.manual_seed(0)
    module = build_algorithm("EQRM", (6,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer)
    reference = build_algorithm("EQRM", (6,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer).double()
    reference.load_state_dict(float64_state(module))
    optimizer = torch.optim.Adam(reference.network.parameters(), lr=HPARAMS["lr"], weight_decay=0.0)
    alpha = torch.tensor(0.8, dtype=torch.float64)
    batches = domain_batches(steps=4)
    for count, batch in enumerate(batches):
        risks = torch.cat([F.cross_entropy(reference.network(x), y).reshape(1) for x, y in minibatches_of(batch)])
        loss = risks.mean() if count < 1 else nonparametric_icdf(risks, alpha)
        if count == 1:
            optimizer = torch.optim.Adam(reference.network.parameters(), lr=HPARAMS["eqrm_lr"], weight_decay=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fit(module, batches)
    state = domainbed_state_dict(module)
    assert state["alpha"].dtype == torch.float64 and state["alpha"].item() == 0.8  # DomainBed's float64 buffer
    assert state["update_count"].item() == 4
    for key, value in reference.state_dict().items():
        if key != "update_count":  # the reference counts in its loop
            # 1e-7 (the issue asks 1e-6): the bisection's 32 halvings round as DomainBed's, not bit for bit.
            torch.testing.assert_close(state[key], value, rtol=1e-7, atol=1e-10)


def test_the_quantile_stays_float64_under_half_precision_and_the_registry_is_domainbeds():
    module = build_algorithm("EQRM", (6,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer)
    module.to(torch.bfloat16)
    assert module.alpha.dtype == torch.float64 and module.classifier.weight.dtype == torch.bfloat16
    defaults = default_hparams("EQRM", "PACS")
    assert (defaults["eqrm_quantile"], defaults["eqrm_burnin_iters"], defaults["eqrm_lr"]) == (0.75, 2500, 1e-6)
    # DomainBed's draw for hparams_seed=1, trial_seed=0 (computed with its hparams_registry): a float burn-in.
    draw = hparams_for("EQRM", "PACS", 1, 0)
    assert [draw[k] for k in ("eqrm_quantile", "eqrm_burnin_iters", "eqrm_lr")] == pytest.approx(
        [0.7335553271795177, 423.2761238000087, 4.377815305398272e-06]
    )
    assert set(domainbed_state_dict(module)) >= {"alpha", "update_count", "network.1.weight"}
    assert pytest.approx(0.8) == float(module.alpha)
