"""ADRMX (issue 27) equals DomainBed's ``ADRMX.update`` written here from its code (with ``SupConLossLambda``),
given the update's remix pairs, through discriminator and generator turns; the pairs depend only on
(seed, update) and each is two distinct samples of its class, every ordered pair as likely."""

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

HPARAMS = {**default_hparams("ADRMX", "PACS"), "lr": 1e-2, "d_steps_per_g_step": 1, "mlp_width": 16, "mlp_depth": 3}


def supcon(features, labels, domain_labels, lamda=0.5, temperature=0.07):  # DomainBed's misc.SupConLossLambda
    normalized = F.normalize(features, p=2, dim=1)
    dots = torch.matmul(normalized, normalized.T) / temperature
    loss, nans = 0, 0
    for i, (label, domain_label) in enumerate(zip(labels, domain_labels)):
        pos_in = torch.logical_and(labels == label, domain_labels == domain_label)
        pos_in[i] = False
        pos_out = torch.logical_and(labels == label, domain_labels != domain_label)
        neg_in = torch.logical_and(labels != label, domain_labels == domain_label)
        neg_out = torch.logical_and(labels != label, domain_labels != domain_label)
        exp_term = torch.cat((lamda * torch.exp(dots[pos_in][:, i]), (1 - lamda) * torch.exp(dots[pos_out][:, i])))
        denom = (
            torch.sum(
                torch.cat(
                    (lamda * torch.exp(dots[neg_in][:, i]), (1 - lamda) * torch.exp(dots[neg_out][:, i]), exp_term)
                )
            )
            + 1e-5
        )
        loss_i = torch.sum(torch.log((exp_term / denom) + 1e-5)) / (dots[pos_in].shape[0] + dots[pos_out].shape[0])
        if torch.isnan(loss_i):
            nans += 1
            continue
        loss -= loss_i
    return loss / (len(features) - nans + 1)


def build(seed=0):
    torch.manual_seed(0)
    return build_algorithm("ADRMX", (6,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer, seed=seed)


def test_k_updates_end_on_domainbeds_weights_given_the_remix_pairs():
    module, ref, drawer = build(), build().double(), build()
    ref.load_state_dict(float64_state(module))
    betas = (0.5, 0.9)
    disc_opt = torch.optim.Adam(ref.discriminator.parameters(), lr=1e-2, betas=betas)
    generator_params = [*ref.featurizer_label.parameters(), *ref.featurizer_domain.parameters(),
                        *ref.classifier_label_1.parameters(), *ref.classifier_label_2.parameters(),
                        *ref.classifier_domain.parameters()]  # fmt: skip
    opt = torch.optim.Adam(generator_params, lr=1e-2, betas=betas)
    batches = domain_batches(steps=4)
    for step, batch in enumerate(batches):
        count = step + 1
        minibatches = minibatches_of(batch)
        all_x, all_y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
        feat_label, feat_domain = ref.featurizer_label(all_x), ref.featurizer_domain(all_x)
        feat_combined = feat_label - feat_domain
        disc_labels = torch.cat([torch.full((len(x),), i) for i, (x, _) in enumerate(minibatches)])
        disc_loss = F.cross_entropy(ref.discriminator(feat_combined), disc_labels)
        if count % 2 < 1:
            disc_opt.zero_grad()
            disc_loss.backward()
            disc_opt.step()
            continue
        drawer.update_index = step
        remixed = 0
        for i, pair in enumerate(drawer.draw_remix_pairs(all_y)):
            indices = torch.where(all_y == i)[0]
            idx1, idx2 = indices[pair[0]], indices[pair[1]]
            pred = ref.classifier_label_1((feat_combined[idx1] + feat_domain[idx2]).view(1, -1))
            remixed += F.cross_entropy(pred.view(1, -1), all_y[idx1].view(-1))
        remixed /= NUM_CLASSES
        gen_loss = (F.cross_entropy(ref.classifier_label_1(feat_label), all_y)
                    + F.cross_entropy(ref.classifier_label_2(feat_combined), all_y)
                    + F.cross_entropy(ref.classifier_domain(feat_domain), disc_labels)
                    + remixed + supcon(feat_label, all_y, disc_labels) + supcon(feat_combined, all_y, disc_labels)
                    - 0.75 * disc_loss)  # fmt: skip
        disc_opt.zero_grad()
        opt.zero_grad()
        gen_loss.backward()
        opt.step()
    fit(module, batches)
    assert {key.split(".")[0] for key in domainbed_state_dict(module)} == {
        "update_count", "featurizer_label", "featurizer_domain", "discriminator", "classifier_label_1",
        "classifier_label_2", "classifier_domain", "network",
    }  # fmt: skip
    for key, value in ref.state_dict().items():
        if key != "update_count":
            torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-9, atol=1e-12)
    assert module.update_count.item() == 4


def test_the_remix_pairs_are_distinct_uniform_and_depend_only_on_seed_and_update():
    module = build()
    y = torch.tensor([0, 0, 0, 1, 1, 2])  # class 0: 3 samples, 6 ordered pairs; class 2: one sample, no pair
    counts: dict = {}
    for seed in range(600):
        module.seed = seed
        pairs = module.draw_remix_pairs(y)
        assert pairs[2] is None and pairs[1] in ((0, 1), (1, 0))
        counts[pairs[0]] = counts.get(pairs[0], 0) + 1
    assert sorted(counts) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    # 600 draws over 6 ordered pairs: 100 ± 9 each; chi-square with 5 degrees of freedom, 20.5 its 0.1% quantile.
    assert sum((n - 100) ** 2 / 100 for n in counts.values()) < 20.5
    module.seed, module.update_index = 3, 4
    assert module.draw_remix_pairs(y) == module.draw_remix_pairs(y)


@pytest.mark.parametrize("dataset, lr", [("PACS", 3e-5), ("ColoredMNIST", 3e-3)])
def test_the_registry_is_domainbeds(dataset, lr):
    defaults = default_hparams("ADRMX", dataset)
    assert (defaults["lr"], defaults["mlp_depth"], defaults["d_steps_per_g_step"], defaults["disc_lambda"]) == (
        lr,
        9,
        2,
        0.75,
    )
