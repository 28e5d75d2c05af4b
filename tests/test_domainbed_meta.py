"""Fish and MLDG (``fishr_lightning.domainbed``, issue 26): ``trainer.fit`` ends on the weights of DomainBed's
update written here from its formulas, a resumed run on the uninterrupted run's (Fish's inner Adam state, MLDG's
draws by (seed, update)), MLDG's random meta split has DomainBed's distribution, the state dicts have DomainBed's
keys, the registry draws DomainBed's hyperparameters, and Fish trains in the app (resumed)."""

from __future__ import annotations

import copy
from collections import Counter
from itertools import cycle

import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import (  # noqa: F401 (one_thread: autouse)
    NUM_CLASSES,
    NUM_DOMAINS,
    Recorded,
    TinyFeaturizer,
    domain_batches,
    fit,
    float64_state,
    minibatches_of,
    one_thread,
)
from torch import nn

from fishr_lightning.domainbed import build_algorithm, default_hparams, domainbed_state_dict, load_domainbed_state_dict
from fishr_lightning.domainbed.algorithm import DomainBedError
from fishr_lightning.domainbed.hparams_registry import hparams_for
from fishr_lightning.domainbed.mldg import MLDGWarning
from fishr_lightning.seeds import seed_hash

LR, WEIGHT_DECAY = 1e-2, 1e-3
# A resume test's fits: updates 1-2 as one whole epoch, then updates 3-4 as the second epoch of the resumed fit
# (a fit stopped by max_steps mid-loader would restart its loader on resume).
ONE_EPOCH, TWO_EPOCHS = {"max_steps": -1, "max_epochs": 1}, {"max_steps": -1, "max_epochs": 2}


def build(name: str, seed: int = 0, **hparams):
    torch.manual_seed(seed)
    full = {**default_hparams(name, "PACS"), "lr": LR, "weight_decay": WEIGHT_DECAY, **hparams}
    return build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, full, featurizer=TinyFeaturizer, seed=seed)


def plain_network(state: dict[str, torch.Tensor], prefix: str) -> nn.Sequential:
    """The reference's own ``featurizer → classifier`` in float64, from the module's weights under ``prefix``."""
    network = nn.Sequential(TinyFeaturizer((6,), {}), nn.Linear(TinyFeaturizer.n_outputs, NUM_CLASSES)).double()
    network.load_state_dict({key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)})
    return network


def assert_weights(module_state: dict, network: nn.Module, prefix: str):
    for key, value in network.state_dict().items():
        torch.testing.assert_close(module_state[prefix + key], value, rtol=1e-10, atol=1e-12, msg=key)


# --- Fish -------------------------------------------------------------------------------------------------
def fish_reference(initial: dict, batches, meta_lr: float):
    """DomainBed's Fish: each update the clone starts from the network's weights, Adam steps it on each domain
    in turn (its moments carried over from the previous update: one Adam on a persistent clone), then
    θ ← θ + meta_lr (θ̃ − θ). Returns the network and clone after each update and the last domains' losses."""
    network = plain_network(initial, "network.net.")
    clone = copy.deepcopy(network)
    optimizer = torch.optim.Adam(clone.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    states, losses = [], []
    for batch in batches:
        clone.load_state_dict(network.state_dict())
        for x, y in minibatches_of(batch):
            loss = F.cross_entropy(clone(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for theta, theta_clone in zip(network.parameters(), clone.parameters()):
                theta += meta_lr * (theta_clone - theta)
        states.append((copy.deepcopy(network), copy.deepcopy(clone)))
        losses.append(loss.item())
    return states, losses


FISH_KEYS = {
    f"network.net.{layer}.{p}" for layer in ("0.hidden", "0.output", "1") for p in ("weight", "bias")
}  # DomainBed's Fish with TinyFeaturizer: network = WholeFish, net = Sequential(featurizer, classifier)


def test_fish_trainer_fit_and_its_resume_end_on_domainbeds_weights(tmp_path):
    module, batches = build("Fish", meta_lr=0.3), domain_batches(steps=4)
    initial = float64_state(module)
    assert set(domainbed_state_dict(module)) == FISH_KEYS  # no clone before the first update, as DomainBed's
    states, losses = fish_reference(initial, batches, meta_lr=0.3)

    recorded = Recorded()
    trainer = fit(module, batches[:2], callbacks=[recorded], **ONE_EPOCH)
    assert trainer.global_step == 2  # one update, one step of the run (DomainBed's optimizer is never stepped)
    state = module.state_dict()
    # After the first update DomainBed's state dict has network_inner.*, the clone of the last update.
    assert set(state) == FISH_KEYS | {key.replace("network.", "network_inner.", 1) for key in FISH_KEYS}
    assert_weights(state, states[1][0], "network.net.")
    assert_weights(state, states[1][1], "network_inner.net.")
    assert [values["loss"] for values in recorded.values] == pytest.approx(losses[:2], rel=1e-12)
    assert not trainer.optimizers[0].state  # DomainBed builds `optimizer` and never steps it
    trainer.save_checkpoint(tmp_path / "two.ckpt")

    # Resumed from 2 updates: the clone's Adam moments come from the checkpoint, so update 4 is the reference's.
    resumed = build("Fish", seed=7, meta_lr=0.3).double()  # float64 before the float64 checkpoint loads
    fit(resumed, batches[2:], ckpt_path=str(tmp_path / "two.ckpt"), **TWO_EPOCHS)
    assert_weights(resumed.state_dict(), states[3][0], "network.net.")

    # DomainBed's state dict, clone included, loads into a fresh module (which makes its clone) and round trips.
    fresh = build("Fish", seed=3, meta_lr=0.3).double()
    load_domainbed_state_dict(fresh, domainbed_state_dict(resumed))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in domainbed_state_dict(resumed).items())


# --- MLDG -------------------------------------------------------------------------------------------------
def mldg_reference_update(network: nn.Module, optimizer, minibatches, perm: list[int], beta: float, n_meta_test: int):
    """DomainBed's first-order MLDG for one permutation of the domains: each meta-train domain i (perm's first
    E − n) paired with the meta-test domains in turn; a copy stepped once by a fresh Adam on L_i; the gradient
    (1/E) Σ (∇L_i(θ) + β ∇L_j(θ')), then the network's Adam step. Returns the logged objective."""
    num_domains = len(minibatches)
    meta_train, meta_test = perm[: num_domains - n_meta_test], perm[-n_meta_test:]
    total = [torch.zeros_like(p) for p in network.parameters()]
    objective = 0.0
    for i, j in zip(meta_train, cycle(meta_test)):
        (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
        n = min(len(xi), len(xj))
        copy_ = copy.deepcopy(network)
        copy_optimizer = torch.optim.Adam(copy_.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        loss_i = F.cross_entropy(copy_(xi[:n]), yi[:n])
        grads_i = torch.autograd.grad(loss_i, list(copy_.parameters()))
        for p, g in zip(copy_.parameters(), grads_i):
            p.grad = g.clone()
        copy_optimizer.step()
        loss_j = F.cross_entropy(copy_(xj[:n]), yj[:n])
        grads_j = torch.autograd.grad(loss_j, list(copy_.parameters()))
        for t, g_i, g_j in zip(total, grads_i, grads_j):
            t += g_i / num_domains + beta * g_j / num_domains
        objective += loss_i.item() + beta * loss_j.item()
    for p, g in zip(network.parameters(), total):
        p.grad = g
    optimizer.step()
    return objective / num_domains


def mldg_perm(seed: int, update: int) -> list[int]:
    """The module's draw: DomainBed's torch.randperm(E), from a generator seeded by (seed, update) only."""
    generator = torch.Generator().manual_seed(seed_hash(seed, update, "torch", "meta_split"))
    return torch.randperm(NUM_DOMAINS, generator=generator).tolist()


def test_mldg_trainer_fit_and_its_resume_end_on_domainbeds_weights_with_the_draws_of_seed_and_update(tmp_path):
    beta, n_meta_test = 0.7, 1
    module, batches = build("MLDG", seed=4, mldg_beta=beta, n_meta_test=n_meta_test), domain_batches(steps=4)
    # DomainBed's MLDG keys are ERM's: featurizer, classifier, and network = Sequential(featurizer, classifier).
    assert {key.split(".")[0] for key in domainbed_state_dict(module)} == {"featurizer", "classifier", "network"}
    network = plain_network(float64_state(module), "network.")
    optimizer = torch.optim.Adam(network.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    states, objectives = [], []
    for update, batch in enumerate(batches):
        perm = mldg_perm(seed=4, update=update)
        objectives.append(mldg_reference_update(network, optimizer, minibatches_of(batch), perm, beta, n_meta_test))
        states.append(copy.deepcopy(network))

    recorded = Recorded()
    trainer = fit(module, batches[:2], callbacks=[recorded], **ONE_EPOCH)
    assert_weights(module.state_dict(), states[1], "network.")
    assert [values["loss"] for values in recorded.values] == pytest.approx(objectives[:2], rel=1e-12)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = build("MLDG", seed=4, mldg_beta=beta, n_meta_test=n_meta_test).double()
    fit(resumed, batches[2:], ckpt_path=str(tmp_path / "two.ckpt"), **TWO_EPOCHS)
    assert_weights(resumed.state_dict(), states[3], "network.")


def test_mldgs_meta_split_has_domainbeds_distribution():
    """One update by hand for many seeds: each lands on the weights of one of DomainBed's meta splits (the
    default n_meta_test=2 of 3 domains: one pair (i, j), six outcomes), and the mean over seeds is within noise
    of the mean over as many of DomainBed's own draws (torch.randperm from the global generator)."""
    seeds, batch = 40, domain_batches(steps=1)[0]
    initial = float64_state(build("MLDG"))
    outcomes = {}
    for perm in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
        network = plain_network(initial, "network.")
        optimizer = torch.optim.Adam(network.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        mldg_reference_update(network, optimizer, minibatches_of(batch), perm, beta=1.0, n_meta_test=2)
        outcomes[tuple(perm[:2])] = torch.cat([p.detach().flatten() for p in network.parameters()])

    def one_update(seed: int, update: int = 0) -> torch.Tensor:
        module = build("MLDG", seed=seed).double()
        module.load_state_dict(initial)
        module.update_index = update
        module.update(minibatches_of(batch))
        return torch.cat([p.detach().flatten() for p in module.network.parameters()])

    drawn = Counter()
    for seed in range(seeds):
        weights = one_update(seed)
        (pair,) = [pair for pair, outcome in outcomes.items() if torch.allclose(weights, outcome, rtol=1e-12)]
        drawn[pair] += 1
    torch.manual_seed(0)
    domainbeds = Counter(tuple(torch.randperm(NUM_DOMAINS).tolist()[:2]) for _ in range(seeds))
    stack = torch.stack(list(outcomes.values()))
    ours = sum(drawn[pair] * outcomes[pair] for pair in outcomes) / seeds
    theirs = sum(domainbeds[pair] * outcomes[pair] for pair in outcomes) / seeds
    standard_error = stack.std(dim=0, unbiased=False) * (2 / seeds) ** 0.5
    figure = float(((ours - theirs).abs() / standard_error.clamp_min(1e-15)).max())
    assert figure < 4.0, figure  # 2.2 for these seeds (max over the parameters of |Δmean| / its standard error)
    assert len(drawn) == 6  # every ordered pair drawn
    torch.testing.assert_close(one_update(5, update=3), one_update(5, update=3), rtol=0, atol=0)  # (seed, update)


def test_mldg_without_a_meta_train_domain_trains_nothing_with_a_warning_and_bad_n_meta_test_is_an_error():
    module = build("MLDG", n_meta_test=3, weight_decay=0.0).double()  # 3 domains, all meta-test: DomainBed's no-op
    before = float64_state(module)
    with pytest.warns(MLDGWarning, match=r"no meta-train domain.*\+hparams\.n_meta_test=1"):
        assert module.update(minibatches_of(domain_batches(steps=1)[0])) == {"loss": 0.0}
    assert all(torch.equal(module.state_dict()[key], value) for key, value in before.items())
    with pytest.raises(DomainBedError, match=r"n_meta_test=0 is not a number of meta-test domains"):
        build("MLDG", n_meta_test=0)


# --- DomainBed's registry ---------------------------------------------------------------------------------
# DomainBed's hparams_registry (default_hparams, and random_hparams(seed_hash(3, 0)): hparams_seed=3,
# trial_seed=0), computed once from /tmp/domainbed's code: the algorithm's own names, lr, weight_decay and
# batch_size per dataset.
DOMAINBEDS_HPARAMS = {
    ("Fish", "PACS"): ({"meta_lr": 0.5}, {"meta_lr": 0.05}),
    ("MLDG", "PACS"): ({"mldg_beta": 1.0, "n_meta_test": 2}, {"mldg_beta": 2.6700750584519914, "n_meta_test": 1}),
    ("MTL", "PACS"): ({"mtl_ema": 0.99}, {"mtl_ema": 1.0}),
    ("ARM", "PACS"): ({"batch_size": 8}, {"batch_size": 8}),
    ("ARM", "DomainNet"): ({"batch_size": 8}, {"batch_size": 8}),
    ("ARM", "ColoredMNIST"): ({"batch_size": 64}, {"batch_size": 259}),
    ("Fish", "ColoredMNIST"): ({"lr": 1e-3, "weight_decay": 0.0}, {"lr": 0.00040753017105436845, "weight_decay": 0.0}),
}
DOMAINBEDS_LARGE = (
    {"lr": 5e-05, "weight_decay": 0.0},
    {"lr": 6.801736841150391e-05, "weight_decay": 1.046949588651311e-05},
)


@pytest.mark.parametrize("algorithm, dataset", list(DOMAINBEDS_HPARAMS))
def test_the_registry_gives_domainbeds_defaults_and_draws(algorithm, dataset):
    default, drawn = DOMAINBEDS_HPARAMS[algorithm, dataset]
    if dataset != "ColoredMNIST":
        default, drawn = {**DOMAINBEDS_LARGE[0], **default}, {**DOMAINBEDS_LARGE[1], **drawn}
    ours_default, ours_drawn = hparams_for(algorithm, dataset, 0, 0), hparams_for(algorithm, dataset, 3, 0)
    assert {key: ours_default[key] for key in default} == default
    assert {key: ours_drawn[key] for key in drawn} == drawn


# --- the app ----------------------------------------------------------------------------------------------
def test_fish_in_the_app_checkpoints_its_clone_and_inner_adam_state_resumes_and_its_model_pt_rebuilds_it(
    monkeypatch, tmp_path
):
    """algorithm=fish on the synthetic dataset, killed after 3 updates: its checkpoint holds the clone
    (network_inner.*) and the clone's Adam state, and the run resumes from it (the app checks the checkpoint's keys
    once the module has made its clone); the resumed updates are the uninterrupted ones (checked exactly by
    test_fish_trainer_fit_and_its_resume_end_on_domainbeds_weights). model.pt reloads and starts another run."""
    from test_app_train import SMALL_SYNTHETIC, final_weights, records, run_app

    from fishr_lightning.app.training.initialisation import load_init
    from fishr_lightning.app.training.run import build_module, load_model

    options = ["algorithm=fish", *SMALL_SYNTHETIC, "steps=5", "checkpoint_freq=2", "+hparams.meta_lr=0.1"]
    killed = ["+callbacks.stop._target_=data_factories.InterruptAfter", "+callbacks.stop.updates=3"]
    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, *options, *killed) != 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 and any(key.startswith("network_inner.") for key in checkpoint["state_dict"])
    inner_adam = checkpoint["fish_optimizer_inner_state"]["state"].values()  # the clone's Adam, one per tensor
    assert inner_adam and all(float(state["step"]) == 3 * 2 for state in inner_adam)  # 3 updates × 2 domains
    assert run_app(monkeypatch, run_dir, *options, "ckpt_path=last") == 0
    assert [r["step"] for r in records(run_dir)] == [0, 2, 4]
    last = records(run_dir)[-1]
    assert last["args"]["algorithm"] == "Fish" and last["hparams"]["meta_lr"] == 0.1 and last["loss"] > 0
    weights = final_weights(run_dir)
    module = load_model(run_dir / "model.pt")
    assert type(module).__name__ == "Fish" and set(module.state_dict()) == set(weights)
    # init_from=model.pt: a new run's Fish (no clone yet) takes the trained one's weights, clone included.
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    shape, classes = tuple(saved["input_shape"]), saved["num_classes"]
    fresh = build_module(saved["backbone"], shape, classes, saved["hparams"], domainbed=saved["domainbed"])
    load_init(fresh, run_dir / "model.pt", saved["backbone"], shape, classes)
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in weights.items())
