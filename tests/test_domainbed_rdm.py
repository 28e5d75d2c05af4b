"""RDM (issue 27) equals DomainBed's ``RDM.update`` written here from its code: the worst domain's per-sample risks
matched to all domains' by a Gaussian-kernel MMD and their variances, switched on at the anneal, where Adam is
re-created with ``rdm_lr``; its registry's per-dataset rules, the batch size included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import (
    INPUT_DIM,
    NUM_CLASSES,
    NUM_DOMAINS,
    TinyFeaturizer,
    domain_batches,
    fit,
    float64_state,
    minibatches_of,
    one_thread,  # noqa: F401 (one_thread: autouse)
)

from fishr_lightning.domainbed import DomainBedError, build_algorithm, default_hparams, domainbed_state_dict
from fishr_lightning.domainbed.hparams_registry import hparams_for

HPARAMS = {**default_hparams("RDM", "PACS"), "lr": 1e-2, "rdm_lr": 3e-3, "rdm_lambda": 2.0, "variance_weight": 0.5,
           "rdm_penalty_anneal_iters": 1}  # fmt: skip


def mmd(x, y, gamma=(0.0001, 0.001, 0.01, 0.1, 1, 10, 100, 1000)):  # DomainBed's RDM.mmd and gaussian_kernel
    def kernel(a, b):
        distances = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).clamp_min(1e-30)
        return sum(torch.exp(-g * distances) for g in gamma)

    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def test_k_updates_end_on_domainbeds_weights_across_the_anneal():
    torch.manual_seed(0)
    module = build_algorithm("RDM", (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer)
    reference = build_algorithm("RDM", (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer)
    reference.double().load_state_dict(float64_state(module))
    optimizer = torch.optim.Adam(reference.network.parameters(), lr=1e-2, weight_decay=0.0)
    batches, logged = domain_batches(steps=3), []
    for count, batch in enumerate(batches):
        minibatches = minibatches_of(batch)
        logits = reference.network(batch[0])
        # DomainBed gathers the losses in torch.zeros(E) (float32): here the logits' dtype, float64.
        losses = torch.stack([F.cross_entropy(reference.network(x), y) for x, y in minibatches])
        risks = torch.stack([F.cross_entropy(logits[batch[2] == e], y, reduction="none") for e, (_, y) in enumerate(minibatches)])  # fmt: skip
        worst = risks[torch.argmax(losses)]
        matching, variance = mmd(worst[:, None], risks.flatten()[:, None]), risks.flatten().var() + worst.var()
        on = count >= 1
        total = losses.mean() + (2.0 * matching + 0.5 * variance if on else 0.0)
        if count == 1:  # DomainBed re-creates Adam with rdm_lr
            optimizer = torch.optim.Adam(reference.network.parameters(), lr=3e-3, weight_decay=0.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        logged.append({"update_count": count + 1, "total_loss": total.item(), "erm_loss": losses.mean().item(),
                       "matching_penalty": matching.item(), "variance_penalty": variance.item(), "rdm_lambda": 2.0})  # fmt: skip
    values, step = [], module.training_step

    def recording_step(batch, batch_idx):
        output = step(batch, batch_idx)
        values.append(output["domainbed"])
        return output

    module.training_step = recording_step
    fit(module, batches)
    state = domainbed_state_dict(module)
    assert state["update_count"].item() == 3
    for key, value in reference.state_dict().items():
        if key != "update_count":
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-12)
    for got, want in zip(values, logged, strict=True):
        assert got == pytest.approx(want, rel=1e-9)
    with pytest.raises(DomainBedError, match=r"same size \(these have \[8, 8, 7\]\).*same batch_size"):
        module.update([*minibatches_of(batches[0])[:2], (batches[0][0][:7], batches[0][1][:7])])


def test_the_registry_is_domainbeds_per_dataset():
    # DomainBed's hparams_registry: defaults, and random_hparams("RDM", dataset, misc.seed_hash(1, 0)) (computed with
    # its code), per dataset: rdm_lambda, rdm_penalty_anneal_iters, variance_weight, rdm_lr, batch_size.
    names = ("rdm_lambda", "rdm_penalty_anneal_iters", "variance_weight", "rdm_lr", "batch_size")
    expected = {
        "PACS": ([5.0, 1500, 0.004, 1.5e-5, 88], [9.375622813369375, 1092, 0.004685630281242425, 1.5055122785774706e-05, 97]),
        "TerraIncognita": ([5.0, 1500, 0.0, 1.5e-5, 40], [9.375622813369375, 1092, 0.0, 1.5055122785774706e-05, 57]),
        "DomainNet": ([0.5, 2400, 0.0, 1.5e-5, 40], [0.9375622813369375, 1730, 0.0, 1.5055122785774706e-05, 57]),
        "OfficeHome": ([5.0, 1500, 0.0, 1.5e-5, 88], [9.313185094706313, 1092, 0.0, 1.5055122785774706e-05, 97]),
        "ColoredMNIST": ([5.0, 1500, 0.004, 1.5e-5, 64], [9.313185094706313, 1092, 0.004685630281242425, 1.5055122785774706e-05, 372]),
    }  # fmt: skip
    for dataset, (defaults, draw) in expected.items():
        assert [default_hparams("RDM", dataset)[k] for k in names] == defaults, dataset
        assert [hparams_for("RDM", dataset, 1, 0)[k] for k in names] == pytest.approx(draw), dataset
