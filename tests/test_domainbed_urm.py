"""URM (issue 27) equals DomainBed's ``URM.update`` written here from its code, given the update's noise; the noise
is DomainBed's ``U[a, b)`` in distribution and depends only on (seed, update)."""

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

HPARAMS = {**default_hparams("URM", "PACS"), "lr": 1e-2, "urm_discriminator_lr": 3e-3, "urm_adv_lambda": 0.2}


def build(seed: int = 0, **hparams):
    torch.manual_seed(0)
    return build_algorithm("URM", (6,), NUM_CLASSES, NUM_DOMAINS, {**HPARAMS, **hparams}, TinyFeaturizer, seed)


def test_k_updates_end_on_domainbeds_weights_given_the_noise():
    module, reference, drawer = build(), build().double(), build().double()
    reference.load_state_dict(float64_state(module))
    # DomainBed's URM: tanh on the features (TinyFeaturizer has no `activation`: URM hooks one), Adam on the
    # network, Adam on the discriminator (a 100-unit LeakyReLU MLP, one hidden layer by default).
    assert [name for name, _ in reference.discriminator.named_children()] == [
        "dense1",
        "act1",
        "dense2",
        "act22",
        "output",
    ]
    optimizer = torch.optim.Adam(reference.network.parameters(), lr=1e-2)
    discriminator_opt = torch.optim.Adam(reference.discriminator.parameters(), lr=3e-3)
    bce = torch.nn.BCEWithLogitsLoss()
    batches = domain_batches(steps=3)
    for step, batch in enumerate(batches):
        minibatches = minibatches_of(batch)
        all_x, all_y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
        feats = torch.tanh(TinyFeaturizer.forward(reference.featurizer, all_x))
        true_y = torch.ones(len(feats), dtype=feats.dtype)
        loss = F.cross_entropy(reference.classifier(feats), all_y) + 0.2 * bce(
            reference.discriminator(feats).squeeze(1), true_y
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        feats = feats.detach()
        drawer.update_index = step
        noise = drawer.draw_noise(feats)[0]
        d_loss = bce(reference.discriminator(noise).squeeze(1), true_y)
        d_loss = d_loss + 0.2 * bce(reference.discriminator(feats).squeeze(1), torch.zeros_like(true_y))
        discriminator_opt.zero_grad()
        d_loss.backward()
        discriminator_opt.step()
    trainer = fit(module, batches)
    assert trainer.global_step == 3  # two optimizers step per update; the run counts updates
    assert {key.split(".")[0] for key in domainbed_state_dict(module)} == {
        "featurizer",
        "classifier",
        "network",
        "discriminator",
    }
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("output, low, high", [("tanh", -1.0, 1.0), ("relu", 0.0, 1.0)])
def test_the_noise_is_uniform_on_the_outputs_range_and_depends_only_on_seed_and_update(output, low, high):
    module = build(urm_generator_output=output).double()
    features = torch.zeros(4000, 5, dtype=torch.float64)
    noise = module.draw_noise(features)[0]
    # U[a, b): mean (a+b)/2, variance (b−a)²/12; 20,000 draws: standard errors 0.004 and 0.002 (for tanh's).
    assert noise.min() >= low and noise.max() < high
    assert noise.mean().item() == pytest.approx((low + high) / 2, abs=0.02)
    assert noise.var().item() == pytest.approx((high - low) ** 2 / 12, abs=0.01)
    module.update_index = 7
    again = module.draw_noise(features)[0]
    module.update_index = 0
    assert torch.equal(module.draw_noise(features)[0], noise) and not torch.equal(again, noise)


def test_the_registry_is_domainbeds():
    names = ("urm_adv_lambda", "urm_discriminator_hidden_layers", "urm_generator_output", "urm_discriminator_lr")
    assert [default_hparams("URM", "PACS")[k] for k in names] == [0.1, 1, "tanh", 5e-5]
    assert default_hparams("URM", "ColoredMNIST")["urm_discriminator_lr"] == 1e-3
    # DomainBed's draws for hparams_seed=1, trial_seed=0 (computed with its hparams_registry).
    assert [hparams_for("URM", "PACS", 1, 0)[k] for k in names] == pytest.approx(
        [0.15952849736568256, 1, "relu", 2.557217597200596e-05]
    )
    assert hparams_for("URM", "ColoredMNIST", 1, 0)["urm_discriminator_lr"] == pytest.approx(0.00023824488158279828)
