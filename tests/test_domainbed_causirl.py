"""CausIRL (issue 27) equals DomainBed's ``AbstractCausIRL.update`` written here from its code, given the update's
cuts; the cuts are DomainBed's ``np.random.randint(0, n_e)`` in distribution and depend only on (seed, update)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import (
    NUM_CLASSES,
    NUM_DOMAINS,
    PER_DOMAIN,
    TinyFeaturizer,
    domain_batches,
    fit,
    float64_state,
    minibatches_of,
)

from fishr_lightning.domainbed import build_algorithm, default_hparams


def my_cdist(x1, x2):  # DomainBed's AbstractCausIRL.my_cdist
    x1_norm = x1.pow(2).sum(dim=-1, keepdim=True)
    x2_norm = x2.pow(2).sum(dim=-1, keepdim=True)
    return torch.addmm(x2_norm.transpose(-2, -1), x1, x2.transpose(-2, -1), alpha=-2).add_(x1_norm).clamp_min_(1e-30)


def gaussian_kernel(x, y, gamma=(0.001, 0.01, 0.1, 1, 10, 100, 1000)):
    distances = my_cdist(x, y)
    return sum(torch.exp(distances.mul(-g)) for g in gamma)


def mmd(x, y, gaussian):  # DomainBed's AbstractCausIRL.mmd
    if gaussian:
        return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cova_x = ((x - mean_x).t() @ (x - mean_x)) / (len(x) - 1)
    cova_y = ((y - mean_y).t() @ (y - mean_y)) / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


def build(name: str, seed: int = 0):
    hparams = {**default_hparams(name, "PACS"), "lr": 1e-2, "mmd_gamma": 3.0}
    torch.manual_seed(0)
    return build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer, seed=seed)


@pytest.mark.parametrize("name", ["CausIRL_CORAL", "CausIRL_MMD"])
def test_k_updates_end_on_domainbeds_weights_given_the_cuts(name):
    module, reference = build(name), build(name).double()
    reference.load_state_dict(float64_state(module))
    batches, cuts, penalties = domain_batches(steps=3), [], []
    step = module.training_step

    def recording_step(batch, batch_idx):
        output = step(batch, batch_idx)
        cuts.append(list(module.last_cuts))
        penalties.append(output["domainbed"]["penalty"])
        return output

    module.training_step = recording_step
    fit(module, batches)
    optimizer = torch.optim.Adam(reference.network.parameters(), lr=1e-2, weight_decay=0.0)
    for batch, cut, logged in zip(batches, cuts, penalties):
        minibatches = minibatches_of(batch)
        features = [reference.featurizer(x) for x, _ in minibatches]
        objective = sum(F.cross_entropy(reference.classifier(z) + 1e-16, y) for z, (_, y) in zip(features, minibatches))
        first = torch.cat([z[:c] for z, c in zip(features, cut)])
        second = torch.cat([z[c:] for z, c in zip(features, cut)])
        penalty = torch.nan_to_num(mmd(first, second, name == "CausIRL_MMD"))
        assert logged == pytest.approx(penalty.item(), rel=1e-9)
        optimizer.zero_grad()
        (objective / len(minibatches) + 3.0 * penalty).backward()
        optimizer.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-9, atol=1e-12)


def test_the_cuts_are_uniform_and_depend_only_on_seed_and_update():
    minibatches = minibatches_of(domain_batches(steps=1)[0])
    counts = np.zeros(PER_DOMAIN)
    module = build("CausIRL_CORAL").double()
    for seed in range(300):  # the draw update() makes (the same method), without the gradient step
        module.seed, module.update_index = seed, 0
        np.add.at(counts, module.draw_cuts([PER_DOMAIN] * NUM_DOMAINS), 1)
    # DomainBed's np.random.randint(0, n_e): uniform on 0..n_e-1. Chi-square with 7 degrees of freedom; 24.3 is its
    # 0.1% quantile (900 draws).
    expected = counts.sum() / PER_DOMAIN
    assert ((counts - expected) ** 2 / expected).sum() < 24.3
    drawn = []
    for update_index in (5, 5, 6):
        module.seed, module.update_index = 1, update_index
        module.update([(x, y) for x, y in minibatches])
        drawn.append(module.last_cuts)
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]
