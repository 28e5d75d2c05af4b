"""IB-ERM and IB-IRM (issue 27) equal DomainBed's ``IB_ERM.update`` / ``IB_IRM.update``, written here from its
code: per domain the cross-entropy, IRM's dummy-scale gradient product (autograd, as DomainBed) and the mean
feature variance; the weights switch on at their anneal steps, where Adam is re-created."""

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
from fishr_lightning.domainbed.hparams_registry import hparams_for as hparams_for_seed


def hparams_for(name: str) -> dict:
    # Anneal steps inside the 4 updates: the penalties switch on and Adam is re-created during the test.
    return {**default_hparams(name, "PACS"), "lr": 1e-2, "ib_lambda": 3.0, "ib_penalty_anneal_iters": 1,
            "irm_lambda": 5.0, "irm_penalty_anneal_iters": 2}  # fmt: skip


def irm_penalty(logits, y):  # DomainBed's IB_IRM._irm_penalty
    scale = torch.tensor(1.0, dtype=logits.dtype).requires_grad_()
    grad_1 = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), [scale], create_graph=True)[0]
    grad_2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
    return torch.sum(grad_1 * grad_2)


@pytest.mark.parametrize("name", ["IB_ERM", "IB_IRM"])
def test_k_updates_end_on_domainbeds_weights_and_logged_penalties(name):
    hparams = hparams_for(name)
    torch.manual_seed(0)
    module = build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer)
    reference = build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer).double()
    reference.load_state_dict(float64_state(module))
    params = list(reference.featurizer.parameters()) + list(reference.classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    batches, logged = domain_batches(steps=4), []
    for count, batch in enumerate(batches):
        nll = irm = ib = 0.0
        for x, y in minibatches_of(batch):
            features = reference.featurizer(x)
            logits = reference.classifier(features)
            nll = nll + F.cross_entropy(logits, y)
            irm = irm + irm_penalty(logits, y)
            ib = ib + features.var(dim=0).mean()
        nll, irm, ib = nll / NUM_DOMAINS, irm / NUM_DOMAINS, ib / NUM_DOMAINS
        loss = nll + (hparams["ib_lambda"] if count >= 1 else 0.0) * ib
        if name == "IB_IRM":
            loss = loss + (hparams["irm_lambda"] if count >= 2 else 1.0) * irm
        if count in ((1, 2) if name == "IB_IRM" else (1,)):
            optimizer = torch.optim.Adam(params, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logged.append(
            {"loss": loss.item(), "IB_penalty": ib.item(), **({"IRM_penalty": irm.item()} if name == "IB_IRM" else {})}
        )

    values = []
    module.training_step = record_values(module.training_step, values)
    fit(module, batches)
    state = domainbed_state_dict(module)
    assert state["update_count"].item() == 4
    for key, value in reference.state_dict().items():
        if key != "update_count":
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-12)
    for got, expected in zip(values, logged):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-9)


def record_values(training_step, values):
    def wrapped(batch, batch_idx):
        output = training_step(batch, batch_idx)
        values.append(output["domainbed"])
        return output

    return wrapped


def test_domainbeds_keys_and_hyperparameters():
    module = build_algorithm("IB_IRM", (6,), NUM_CLASSES, NUM_DOMAINS, hparams_for("IB_IRM"), featurizer=TinyFeaturizer)
    assert set(domainbed_state_dict(module)) == {
        *(f"featurizer.{layer}.{p}" for layer in ("hidden", "output") for p in ("weight", "bias")),
        *(f"network.0.{layer}.{p}" for layer in ("hidden", "output") for p in ("weight", "bias")),
        "classifier.weight", "classifier.bias", "network.1.weight", "network.1.bias", "update_count",
    }  # fmt: skip
    # DomainBed's registry: its defaults, and its draw for hparams_seed=1, trial_seed=0 (hparams_registry.
    # random_hparams("IB_IRM", "PACS", misc.seed_hash(1, 0)), computed with DomainBed's code).
    names = ("irm_lambda", "irm_penalty_anneal_iters", "ib_lambda", "ib_penalty_anneal_iters", "lr", "batch_size")
    defaults, draw = default_hparams("IB_IRM", "PACS"), hparams_for_seed("IB_IRM", "PACS", 1, 0)
    assert [defaults[k] for k in names] == [100.0, 500, 100.0, 500, 5e-5, 32]
    assert [draw[k] for k in names] == pytest.approx(
        [65030.52212762795, 2, 2.661822006035993, 1222, 2.7028930742148706e-05, 39]
    )
