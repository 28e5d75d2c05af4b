"""ARM and MTL (``fishr_lightning.domainbed``, issue 26): ``trainer.fit`` ends on the weights of DomainBed's
update written here from its formulas (ARM's context per domain, its context net in no optimizer; MTL's
embeddings EMA and ``normal_()`` noise drawn by (seed, update), resumed), MTL's noise has DomainBed's
distribution, both predict at test time as DomainBed's, and the state dicts have DomainBed's keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import (  # noqa: F401 (one_thread: autouse)
    NUM_CLASSES,
    NUM_DOMAINS,
    PER_DOMAIN,
    Recorded,
    TinyFeaturizer,
    domain_batches,
    fit,
    minibatches_of,
    one_thread,
)
from torch import nn

from fishr_lightning.domainbed import build_algorithm, default_hparams, domainbed_state_dict, load_domainbed_state_dict
from fishr_lightning.domainbed.algorithm import DomainBedError
from fishr_lightning.seeds import seed_hash

LR, WEIGHT_DECAY = 1e-2, 1e-3
IMAGE = (2, 4, 4)  # ARM's inputs: C × H × W


def assert_close_states(actual: dict, expected: dict, prefix: str = ""):
    for key, value in expected.items():
        torch.testing.assert_close(actual[prefix + key], value, rtol=1e-10, atol=1e-12, msg=key)


# --- ARM --------------------------------------------------------------------------------------------------
class TinyImageFeaturizer(nn.Module):
    """Flattened images through two linear layers: ``n_outputs = 5``; records the input shapes it was built for."""

    n_outputs = 5
    built_for: list[tuple[int, ...]] = []

    def __init__(self, input_shape: tuple[int, ...], hparams: dict) -> None:
        super().__init__()
        TinyImageFeaturizer.built_for.append(tuple(input_shape))
        self.hidden = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], 7)
        self.output = nn.Linear(7, self.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x.flatten(1))))


def image_batches(steps: int):
    generator = torch.Generator().manual_seed(2)
    domain = torch.arange(NUM_DOMAINS).repeat_interleave(PER_DOMAIN)
    return [
        (
            torch.randn(NUM_DOMAINS * PER_DOMAIN, *IMAGE, generator=generator, dtype=torch.float64)
            + domain[:, None, None, None],
            torch.randint(0, NUM_CLASSES, (NUM_DOMAINS * PER_DOMAIN,), generator=generator),
            domain,
        )
        for _ in range(steps)
    ]


def arm(seed: int = 0):
    torch.manual_seed(seed)
    # batch_size is the support size: one domain's minibatch (PER_DOMAIN = 8, DomainBed's ARM default on PACS).
    hparams = {**default_hparams("ARM", "PACS"), "lr": LR, "weight_decay": WEIGHT_DECAY}
    assert hparams["batch_size"] == PER_DOMAIN
    return build_algorithm("ARM", IMAGE, NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyImageFeaturizer, seed=seed)


def context_network(state: dict) -> nn.Sequential:
    """DomainBed's ContextNet, the reference's own copy."""
    network = nn.Sequential(
        nn.Conv2d(IMAGE[0], 64, 5, padding=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 5, padding=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 1, 5, padding=2),
    ).double()
    prefix = "context_net.context_net."
    network.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return network


def arm_network(state: dict) -> nn.Sequential:
    network = nn.Sequential(TinyImageFeaturizer((IMAGE[0] + 1, *IMAGE[1:]), {}), nn.Linear(5, NUM_CLASSES)).double()
    network.load_state_dict({k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")})
    return network


ARM_KEYS = (
    {f"{prefix}{layer}.{p}" for prefix, layers in (("featurizer.", ("hidden", "output")), ("network.0.", ("hidden", "output"))) for layer in layers for p in ("weight", "bias")}
    | {f"{head}.{p}" for head in ("classifier", "network.1") for p in ("weight", "bias")}
    | {f"context_net.context_net.{layer}.{p}" for layer in (0, 3, 6) for p in ("weight", "bias")}
    | {f"context_net.context_net.{layer}.{p}" for layer in (1, 4) for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
)  # fmt: skip


def test_arm_trainer_fit_ends_on_domainbeds_weights_with_the_context_net_in_no_optimizer():
    TinyImageFeaturizer.built_for.clear()
    module, batches = arm(), image_batches(steps=3)
    assert TinyImageFeaturizer.built_for == [(3, 4, 4)]  # the featurizer is built for the context channel
    assert set(domainbed_state_dict(module)) == ARM_KEYS
    initial = {k: (v.double() if v.is_floating_point() else v).clone() for k, v in module.state_dict().items()}
    # DomainBed's ARM: ERM's Adam on `network` only; each domain's context is the mean of the context net's maps
    # over its minibatch (the support set), appended as a channel; the context net's BatchNorm in training mode.
    network, context = arm_network(initial), context_network(initial)
    optimizer = torch.optim.Adam(network.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    for x, y, domain in batches:
        maps = context(x)
        channel = torch.cat([maps[domain == d].mean(0, keepdim=True).expand(PER_DOMAIN, -1, -1, -1) for d in range(3)])
        loss = F.cross_entropy(network(torch.cat([x, channel], 1)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    recorded = Recorded()
    fit(module, batches, callbacks=[recorded])
    state = module.state_dict()
    assert_close_states(state, network.state_dict(), "network.")
    assert_close_states(state, context.state_dict(), "context_net.context_net.")  # its BatchNorm statistics moved
    for layer in (0, 3, 6):  # and its weights did not: DomainBed's optimizer has only the network's parameters
        assert torch.equal(
            state[f"context_net.context_net.{layer}.weight"], initial[f"context_net.context_net.{layer}.weight"]
        )
    assert [values["loss"] for values in recorded.values] == pytest.approx(losses, rel=1e-12)

    # Test time (eval mode): consecutive groups of batch_size samples share a context; a batch whose size
    # batch_size does not divide is one support set.
    module.eval(), network.eval(), context.eval()
    x = batches[0][0][:20]
    for rows, groups in ((x[:16], [range(0, 8), range(8, 16)]), (x[:10], [range(0, 10)])):
        maps = context(rows)
        channel = torch.cat([maps[list(g)].mean(0, keepdim=True).expand(len(g), -1, -1, -1) for g in groups])
        torch.testing.assert_close(module.predict(rows), network(torch.cat([rows, channel], 1)), rtol=1e-10, atol=1e-12)

    fresh = arm(seed=3).double()
    load_domainbed_state_dict(fresh, domainbed_state_dict(module))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in domainbed_state_dict(module).items())


def test_arm_on_vectors_is_an_error_that_says_it_needs_images():
    hparams = default_hparams("ARM", "PACS")
    with pytest.raises(DomainBedError, match=r"ARM needs images \(C, H, W\).*\(6,\)"):
        build_algorithm("ARM", (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer)


# --- MTL --------------------------------------------------------------------------------------------------
def mtl(seed: int = 0, ema: float = 0.9):
    torch.manual_seed(seed)
    hparams = {**default_hparams("MTL", "PACS"), "lr": LR, "weight_decay": WEIGHT_DECAY, "mtl_ema": ema}
    return build_algorithm("MTL", (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer, seed=seed)


def mtl_reference(state: dict):
    featurizer, classifier = TinyFeaturizer((6,), {}).double(), nn.Linear(10, NUM_CLASSES).double()
    featurizer.load_state_dict(
        {k.removeprefix("featurizer."): v for k, v in state.items() if k.startswith("featurizer.")}
    )
    classifier.load_state_dict(
        {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
    )
    optimizer = torch.optim.Adam([*featurizer.parameters(), *classifier.parameters()], lr=LR, weight_decay=WEIGHT_DECAY)
    return featurizer, classifier, state["embeddings"].clone(), optimizer


def mtl_reference_update(featurizer, classifier, embeddings, optimizer, minibatches, ema: float, noise) -> float:
    """DomainBed's MTL.update: the sum over domains of CE(classifier([φ(x); noise])), the embeddings' EMA
    (weight ema on the new mean) kept, the embedding itself replaced by ``noise(env, rows)``."""
    loss = 0
    for env, (x, y) in enumerate(minibatches):
        features = featurizer(x)
        embeddings[env] = (ema * features.mean(0) + (1 - ema) * embeddings[env]).detach()
        loss += F.cross_entropy(classifier(torch.cat([features, noise(env, features)], 1)), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_mtl_trainer_fit_and_its_resume_end_on_domainbeds_weights_with_the_noise_of_seed_and_update(tmp_path):
    module, batches = mtl(seed=5), domain_batches(steps=4)
    assert set(domainbed_state_dict(module)) == {
        *(f"featurizer.{layer}.{p}" for layer in ("hidden", "output") for p in ("weight", "bias")),
        "classifier.weight",
        "classifier.bias",
        "embeddings",
    }
    initial = {k: v.double().clone() for k, v in module.state_dict().items()}
    featurizer, classifier, embeddings, optimizer = mtl_reference(initial)
    states, losses = [], []
    for update, batch in enumerate(batches):

        def noise(env, features, update=update):  # DomainBed's normal_(), from (seed, update, env) here
            seed = seed_hash(5, update, "torch", f"embedding{env}")
            return torch.randn(features.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

        losses.append(
            mtl_reference_update(featurizer, classifier, embeddings, optimizer, minibatches_of(batch), 0.9, noise)
        )
        states.append(copy.deepcopy((featurizer.state_dict(), classifier.state_dict(), embeddings.clone())))

    recorded = Recorded()
    trainer = fit(module, batches[:2], callbacks=[recorded], max_steps=-1, max_epochs=1)
    assert [values["loss"] for values in recorded.values] == pytest.approx(losses[:2], rel=1e-12)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = mtl(seed=5).double()
    fit(resumed, batches[2:], ckpt_path=str(tmp_path / "two.ckpt"), max_steps=-1, max_epochs=2)
    state = resumed.state_dict()
    assert_close_states(state, states[3][0], "featurizer.")
    assert_close_states(state, states[3][1], "classifier.")
    torch.testing.assert_close(state["embeddings"], states[3][2], rtol=1e-10, atol=1e-12)

    # Test time: the embedding is N(0, 1) noise too, from a generator of (seed, update) restarted by eval() and
    # advanced from batch to batch; the global generator is left alone.
    resumed.eval()
    x, global_state = batches[0][0][:5], torch.get_rng_state()
    first, second = resumed.predict(x), resumed.predict(x)
    generator = torch.Generator().manual_seed(seed_hash(5, resumed.update_index, "torch", "test_embedding"))
    expected = [
        resumed.classifier(
            torch.cat([resumed.featurizer(x), torch.randn(5, 5, generator=generator, dtype=torch.float64)], 1)
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(first, expected[0]), torch.testing.assert_close(second, expected[1])
    torch.testing.assert_close(resumed.eval().predict(x), first)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_mtls_noise_has_domainbeds_distribution():
    """The one-step update's mean (weights and logged loss) over seeds within noise of DomainBed's, whose noise is `.normal_()` of the
    global generator in place on the repeated embedding; the same (seed, update) draws the same noise."""
    seeds, batch = 30, minibatches_of(domain_batches(steps=1)[0])
    initial = {k: v.double().clone() for k, v in mtl().state_dict().items()}

    def ours(seed: int, update: int = 0) -> torch.Tensor:
        module = mtl(seed=seed).double()
        module.load_state_dict(initial)
        module.update_index = update
        loss = module.update(batch)["loss"]
        weights = [p.detach().flatten() for p in (*module.featurizer.parameters(), *module.classifier.parameters())]
        return torch.cat([*weights, torch.tensor([loss], dtype=torch.float64)])

    def domainbeds() -> torch.Tensor:
        featurizer, classifier, embeddings, optimizer = mtl_reference(initial)

        def noise(env, features):
            return embeddings[env].view(1, -1).repeat(len(features), 1).normal_()

        loss = mtl_reference_update(featurizer, classifier, embeddings, optimizer, batch, 0.9, noise)
        weights = [p.detach().flatten() for p in (*featurizer.parameters(), *classifier.parameters())]
        return torch.cat([*weights, torch.tensor([loss], dtype=torch.float64)])

    our_updates = torch.stack([ours(seed) for seed in range(seeds)])
    torch.manual_seed(0)
    their_updates = torch.stack([domainbeds() for _ in range(seeds)])
    standard_error = ((our_updates.var(0) + their_updates.var(0)) / seeds).sqrt()
    figure = float(((our_updates.mean(0) - their_updates.mean(0)).abs() / standard_error.clamp_min(1e-15)).max())
    # 1.9 for these seeds (max over the parameters and the loss of |Δmean| / its standard error); 6.0 with 2·N(0, 1)
    assert figure < 4.0, figure
    assert our_updates.std(0).max() > 1e-4  # the noise moves the update
    torch.testing.assert_close(ours(3, update=2), ours(3, update=2), rtol=0, atol=0)


# --- the app ----------------------------------------------------------------------------------------------
def test_arm_composes_in_the_app_and_builds_domainbeds_class_on_the_app_backbone_with_the_context_channel():
    """algorithm=arm on ColoredMNIST builds DomainBed's ARM with the registry's defaults, the app's MNIST CNN built
    for the images' two channels and the context's (Fish trains in the app in test_domainbed_meta.py; MLDG and
    MTL, like every DomainBed class on vectors, are built by the app's test of every config)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from fishr_lightning.app.training.run import CONFIG_MODULE, build_module, domainbed_options, resolve_hparams

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["algorithm=arm", "dataset=colored_mnist"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.algorithm.name == "ARM" and cfg.algorithm.domainbed is True and dict(cfg.algorithm.callbacks) == {}
    hparams = resolve_hparams(cfg)
    with open_dict(cfg):
        cfg.hparams, cfg.num_train_domains = hparams, 2
    expected = {key: value for key, value in default_hparams("ARM", "ColoredMNIST").items() if key != "resnet18"}
    assert {key: hparams[key] for key in expected} == expected
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    module = build_module(backbone, (2, 28, 28), 2, hparams, domainbed=domainbed_options(cfg))
    assert type(module).__name__ == "ARM" and module.num_domains == 2
    assert next(module.featurizer.parameters()).shape[1] == 3  # the app's MNIST CNN: two channels and the context
    assert module.support_size == 64  # DomainBed's registry: ColoredMNIST's batch_size
    assert module(torch.zeros(5, 2, 28, 28)).shape == (5, 2)
