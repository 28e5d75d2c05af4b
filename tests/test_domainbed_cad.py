"""CAD and CondCAD (issue 27) equal DomainBed's ``AbstractCAD.update`` with its ``bn_loss`` written here from its
code (SupCon-style masks), flipped or not, normalised or not."""

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


def bn_loss(z, y, dom_labels, temperature, is_conditional, is_flipped):  # DomainBed's AbstractCAD.bn_loss
    batch_size = z.shape[0]
    y, dom_labels = y.contiguous().view(-1, 1), dom_labels.contiguous().view(-1, 1)
    mask_y = torch.eq(y, y.T)
    mask_d = torch.eq(dom_labels, dom_labels.T)
    mask_drop = ~torch.eye(batch_size).bool()
    mask_y &= mask_drop
    mask_y_n_d, mask_y_d = mask_y & (~mask_d), mask_y & mask_d
    mask_y, mask_drop, mask_y_n_d, mask_y_d = (
        mask_y.double(),
        mask_drop.double(),
        mask_y_n_d.double(),
        mask_y_d.double(),
    )
    logits = (z @ z.T) / temperature * mask_drop
    logits = logits - torch.max(logits, dim=1, keepdim=True)[0].detach()
    if not is_conditional:
        log_prob = logits - torch.logsumexp(logits + mask_drop.log(), dim=1, keepdim=True)
        mask_valid = mask_y.sum(1) > 0
        log_prob, mask_d = log_prob[mask_valid], mask_d[mask_valid]
        if is_flipped:
            loss = -(temperature / 0.07) * torch.logsumexp(log_prob + (~mask_d).double().log(), dim=1)
        else:
            loss = (temperature / 0.07) * torch.logsumexp(log_prob + mask_d.double().log(), dim=1)
    else:
        mask_valid = (mask_y_n_d.sum(1) > 0) if is_flipped else (mask_y_d.sum(1) > 0)
        mask_y, mask_y_d, mask_y_n_d, logits = (
            mask_y[mask_valid],
            mask_y_d[mask_valid],
            mask_y_n_d[mask_valid],
            logits[mask_valid],
        )
        log_prob_y = logits - torch.logsumexp(logits + mask_y.log(), dim=1, keepdim=True)
        if is_flipped:
            loss = -(temperature / 0.07) * torch.logsumexp(log_prob_y + mask_y_n_d.log(), dim=1)
        else:
            loss = (temperature / 0.07) * torch.logsumexp(log_prob_y + mask_y_d.log(), dim=1)
    finite = torch.isfinite(loss)
    return torch.where(finite, loss, torch.tensor(0.0).to(loss)).sum() / finite.double().sum()


@pytest.mark.parametrize(
    "name, flipped, normalized", [("CAD", True, False), ("CondCAD", True, False), ("CondCAD", False, True)]
)
def test_k_updates_end_on_domainbeds_weights(name, flipped, normalized):
    hparams = {
        **default_hparams(name, "PACS"),
        "lr": 1e-2,
        "lmbda": 0.5,
        "is_flipped": flipped,
        "is_normalized": normalized,
    }
    torch.manual_seed(0)
    module = build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer)
    reference = build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer).double()
    reference.load_state_dict(float64_state(module))
    optimizer = torch.optim.Adam([*reference.featurizer.parameters(), *reference.classifier.parameters()], lr=1e-2)
    batches = domain_batches(steps=3)
    for batch in batches:
        minibatches = minibatches_of(batch)
        all_x, all_y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
        all_d = torch.cat([torch.full((len(x),), i) for i, (x, _) in enumerate(minibatches)])
        all_z = reference.featurizer(all_x)
        z = F.normalize(all_z, dim=1) if normalized else all_z
        loss = F.cross_entropy(reference.classifier(all_z), all_y)
        loss = loss + 0.5 * bn_loss(z, all_y, all_d, hparams["temperature"], name == "CondCAD", flipped)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fit(module, batches)
    # DomainBed's AbstractCAD has no `network`: featurizer.* and classifier.* only.
    assert {key.split(".")[0] for key in domainbed_state_dict(module)} == {"featurizer", "classifier"}
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-9, atol=1e-12)


def test_the_registry_is_domainbeds():
    names = ("lmbda", "temperature", "is_normalized", "is_project", "is_flipped")
    assert [default_hparams("CAD", "PACS")[k] for k in names] == [0.1, 0.1, False, False, True]
    # DomainBed's draw for hparams_seed=1, trial_seed=0 (computed with its hparams_registry).
    assert [hparams_for("CondCAD", "PACS", 1, 0)[k] for k in names] == [0.1, 0.05, False, False, True]
