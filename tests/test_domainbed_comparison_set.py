"""The algorithms the app had before issue 26 (Fishr, IRM, VREx, CORAL, MMD, GroupDRO, Mixup, SD) built as
DomainBed's classes by ``build_algorithm``: K updates of ``trainer.fit`` end on the weights of DomainBed's
``update()`` written in tests/baselines_reference.py and tests/fishr_reference.py (the references the app's
callbacks are held to in test_baselines_callbacks.py, so both routes train alike), with DomainBed's state-dict
keys, its resume state and, for Mixup, its draws' distribution."""

from __future__ import annotations

import copy

import baselines_reference as ref
import numpy as np
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
    minibatches_of,
)
from fishr_reference import ReferenceFishr
from lightning.pytorch.callbacks import Callback

from fishr_lightning import FishrCallback
from fishr_lightning.app.training.module import DomainClassifier
from fishr_lightning.domainbed import (
    DomainBedError,
    build_algorithm,
    default_hparams,
    domainbed_state_dict,
    load_domainbed_state_dict,
)

LR, STEPS, ANNEAL = 2e-2, 3, 1
OWN_HPARAMS = {
    "IRM": {"irm_lambda": 10.0, "irm_penalty_anneal_iters": ANNEAL},
    "VREx": {"vrex_lambda": 10.0, "vrex_penalty_anneal_iters": ANNEAL},
    "CORAL": {"mmd_gamma": 5.0},
    "MMD": {"mmd_gamma": 5.0},
    "GroupDRO": {"groupdro_eta": 0.5},
    "Mixup": {"mixup_alpha": 0.4},
    "SD": {"sd_reg": 0.1},
    "Fishr": {"lambda": 100.0, "penalty_anneal_iters": ANNEAL, "ema": 0.9},
}


def hparams(name: str) -> dict:
    # weight_decay 0: the references' Adam has none.
    return {**default_hparams(name, "PACS"), "lr": LR, "weight_decay": 0.0, **OWN_HPARAMS[name]}


def algorithm(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_algorithm(name, (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, hparams(name), TinyFeaturizer, seed=seed)


class Returned(Callback):
    """DomainBed's returned dict of each update (``training_step``'s output)."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["domainbed"])


def mixup_draws(module, update_index: int) -> tuple[list[int], list[float]]:
    """The permutation and λ's of ``module``'s update ``update_index``, drawn as Mixup.update draws them."""
    module.update_index = update_index
    perm = torch.randperm(NUM_DOMAINS, generator=module.generator("pairs")).tolist()
    state, alpha = module.random_state("lambda"), module.hparams["mixup_alpha"]
    return perm, [float(state.beta(alpha, alpha)) for _ in range(NUM_DOMAINS)]


class DomainBedFishr:
    """DomainBed's ``Fishr.update`` by hand: λ = 0 before the annealing update, Adam re-created there (unless
    it is update 0), the penalty of tests/fishr_reference.py (per-sample gradients one sample at a time)."""

    def __init__(self, featurizer, classifier, hparams):
        self.featurizer, self.classifier, self.hparams = featurizer, classifier, hparams
        self.penalty = ReferenceFishr(NUM_DOMAINS, ema=hparams["ema"])
        self.make_optimizer = lambda: torch.optim.Adam([*featurizer.parameters(), *classifier.parameters()], lr=LR)
        self.optimizer, self.update_count = self.make_optimizer(), 0

    def update(self, minibatches):
        all_x, all_y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
        domains = torch.arange(len(minibatches)).repeat_interleave(torch.tensor([len(y) for _, y in minibatches]))
        all_z = self.featurizer(all_x)
        all_logits = self.classifier(all_z)
        penalty = self.penalty(self.classifier, all_z, all_y, domains)
        nll = F.cross_entropy(all_logits, all_y)
        weight = 0.0
        if self.update_count >= self.hparams["penalty_anneal_iters"]:
            weight = self.hparams["lambda"]
            if self.update_count == self.hparams["penalty_anneal_iters"] != 0:
                self.optimizer = self.make_optimizer()
        self.update_count += 1
        objective = nll + weight * penalty
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": objective.item(), "nll": nll.item(), "penalty": penalty.item()}


def reference_updates(name, module, batches):
    """DomainBed's updates from ``module``'s weights (float64), by the tests' references; returns the
    reference (its ``featurizer``/``classifier``) and its returned dicts."""
    featurizer, classifier = copy.deepcopy(module.featurizer).double(), copy.deepcopy(module.classifier).double()
    if name == "Fishr":
        reference = DomainBedFishr(featurizer, classifier, hparams(name))
        return reference, [reference.update(minibatches_of(batch)) for batch in batches]
    reference = ref.DomainBedAlgorithm(name, featurizer, classifier, hparams(name), LR)
    returned = []
    for index, batch in enumerate(batches):
        minibatches = minibatches_of(batch)
        perm, lams = mixup_draws(module, index) if name == "Mixup" else (None, None)
        last_nll = F.cross_entropy(reference.network(minibatches[-1][0]), minibatches[-1][1]).item()
        returned.append(reference.update(minibatches, lams=lams, perm=perm))
        if name == "VREx":  # DomainBed's VREx logs as `nll` its loop variable: the last domain's risk
            returned[-1]["nll"] = last_nll
    return reference, returned


@pytest.mark.parametrize("name", list(OWN_HPARAMS))
def test_k_updates_of_trainer_fit_end_on_domainbeds_weights(name):
    module, batches = algorithm(name), domain_batches(STEPS)
    reference, expected = reference_updates(name, module, batches)
    returned = Returned()
    trainer = fit(module, batches, callbacks=[returned])
    assert trainer.global_step == STEPS
    for ours, theirs in ((module.featurizer, reference.featurizer), (module.classifier, reference.classifier)):
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, key=key: f"{name} {key}: {m}")
    for ours, theirs in zip(returned.values, expected, strict=True):
        assert set(theirs) <= set(ours)
        assert {k: ours[k] for k in theirs} == pytest.approx(theirs, rel=1e-10, abs=1e-12)
    if "update_count" in module.state_dict():
        assert module.update_count.tolist() == [STEPS]


def test_fishr_trains_as_the_apps_module_with_fishr_callback():
    """The two routes to DomainBed's Fishr, the class and the app's DomainClassifier with FishrCallback (what
    algorithm=fishr runs), end on the same weights from the same ones: the class's, DomainBed's reference (the
    test above). The other callbacks are held to the same references in test_baselines_callbacks.py."""
    module, batches = algorithm("Fishr"), domain_batches(STEPS)
    app_module = DomainClassifier(copy.deepcopy(module.featurizer), NUM_CLASSES, lr=LR, weight_decay=0.0)
    app_module.classifier.load_state_dict(module.classifier.state_dict())
    own = OWN_HPARAMS["Fishr"]
    callback = FishrCallback(
        penalty_weight=own["lambda"], warmup_steps=own["penalty_anneal_iters"], ema=own["ema"], num_domains=3
    )
    reference, _ = reference_updates("Fishr", module, batches)  # where the class's fit ends (the test above)
    fit(app_module, batches, callbacks=[callback])
    for ours, theirs in ((reference.featurizer, app_module.featurizer), (reference.classifier, app_module.classifier)):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# DomainBed's state-dict keys with TinyFeaturizer: ERM's networks (featurizer, classifier and their aliases in
# network = Sequential(featurizer, classifier)) and the algorithm's buffers.
NETWORK_KEYS = {
    f"{prefix}.{layer}.{p}" for prefix in ("featurizer", "network.0") for layer in ("hidden", "output")
    for p in ("weight", "bias")
} | {f"{prefix}.{p}" for prefix in ("classifier", "network.1") for p in ("weight", "bias")}  # fmt: skip
BUFFERS = {"IRM": {"update_count"}, "VREx": {"update_count"}, "Fishr": {"update_count"}, "GroupDRO": {"q"}}


@pytest.mark.parametrize("name", list(OWN_HPARAMS))
def test_domainbeds_state_dict_keys_load_and_round_trip(name):
    module = algorithm(name)
    state = domainbed_state_dict(module)
    assert set(state) == NETWORK_KEYS | BUFFERS.get(name, set())
    if name == "GroupDRO":  # DomainBed's q: empty before the first update, one weight per domain after it
        assert state["q"].shape == (0,)
        state["q"] = torch.tensor([0.2, 0.3, 0.5])
    if "update_count" in state:
        state["update_count"] = torch.tensor([7])
    other = algorithm(name, seed=5)
    load_domainbed_state_dict(other, state)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value), key
    assert set(domainbed_state_dict(other)) == set(state)


def test_groupdros_q_is_resized_by_every_load_and_its_updates_continue_from_it():
    """A checkpoint (Lightning's resume loads the module's state dict) or DomainBed's model_dict holds q after
    the first update; the fresh module's q is empty (DomainBed's), and is resized to load it."""
    trained, batches = algorithm("GroupDRO").double(), domain_batches(2)
    trained.update(minibatches_of(batches[0]))
    assert trained.q.shape == (NUM_DOMAINS,) and trained.q.sum().item() == pytest.approx(1.0)
    resumed = algorithm("GroupDRO", seed=3).double()
    resumed.load_state_dict(trained.state_dict())
    torch.testing.assert_close(resumed.q, trained.q)
    q_before = trained.q.clone()
    losses = torch.stack([F.cross_entropy(trained.predict(x), y) for x, y in minibatches_of(batches[1])]).detach()
    resumed.update(minibatches_of(batches[1]))
    expected = q_before * torch.exp(0.5 * losses)
    torch.testing.assert_close(resumed.q, expected / expected.sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["Fishr", "Mixup"])
def test_a_run_resumed_from_a_checkpoint_ends_on_the_uninterrupted_weights(name, tmp_path):
    """Fishr's EMA of each domain's gradient variances is not in DomainBed's state dict: the checkpoint keeps
    it (on_save_checkpoint). Mixup's draws depend on (seed, update) only. So update 2 of a run resumed after
    update 2 is the uninterrupted run's."""
    module, batches = algorithm(name), domain_batches(STEPS)
    reference, _ = reference_updates(name, module, batches)
    trainer = fit(module, batches[:2])
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = algorithm(name, seed=0).double()  # Lightning loads the checkpoint before precision's .double()
    torch.nn.init.zeros_(resumed.classifier.weight)  # the checkpoint's weights, not these
    fit(resumed, batches[2:], ckpt_path=tmp_path / "two.ckpt", max_steps=STEPS)
    if name == "Fishr":
        assert resumed.update_count.tolist() == [STEPS] and resumed.fishr_penalty.num_updates == STEPS
    for ours, theirs in ((resumed.featurizer, reference.featurizer), (resumed.classifier, reference.classifier)):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def one_step_updates(module, batch, draws: int):
    """``draws`` one-step updates of Mixup from ``module``'s weights: ours (seeds ``0 .. draws − 1``) and DomainBed's
    (its own draws: ``torch.randperm``, ``np.random.beta``), each row the network's parameters after the update."""
    ours, theirs = [], []
    state, generator = np.random.RandomState(0), torch.Generator().manual_seed(0)
    for seed in range(draws):
        mixed = copy.deepcopy(module)
        mixed.seed = seed
        mixed.update(batch)
        ours.append(torch.cat([p.detach().flatten() for p in mixed.network.parameters()]))
        reference = ref.DomainBedAlgorithm(
            "Mixup", copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier), hparams("Mixup"), LR
        )
        perm = torch.randperm(NUM_DOMAINS, generator=generator).tolist()
        reference.update(batch, lams=[state.beta(0.4, 0.4) for _ in range(NUM_DOMAINS)], perm=perm)
        theirs.append(torch.cat([p.detach().flatten() for p in reference.network.parameters()]))
    return torch.stack(ours), torch.stack(theirs)


def test_mixups_draws_depend_on_seed_and_update_and_have_domainbeds_distribution():
    """The same (seed, update) draws the same permutation and λ's; over many seeds the one-step update's mean
    is within noise of DomainBed's over as many of its own draws."""
    module = algorithm("Mixup").double()
    assert mixup_draws(module, 4) == mixup_draws(module, 4) != mixup_draws(module, 5)
    threads, draws = torch.get_num_threads(), 120
    torch.set_num_threads(1)  # 240 updates of a 100-weight network: a second thread only waits
    try:
        ours, theirs = one_step_updates(module, minibatches_of(domain_batches(1)[0]), draws)
    finally:
        torch.set_num_threads(threads)
    standard_error = ((ours.var(dim=0) + theirs.var(dim=0)) / draws).sqrt()
    z = (ours.mean(dim=0) - theirs.mean(dim=0)).abs() / standard_error.clamp_min(1e-12)
    assert z.max() < 5, z.max()  # 106 weights: max |z| of independent normals is ~3 at most
    assert ours.std(dim=0).min() > 0  # every weight's update depends on the draws


def test_fishr_refuses_a_nonlinear_classifier_and_a_batch_without_every_domain():
    with pytest.raises(DomainBedError, match="nonlinear_classifier=True"):
        build_algorithm("Fishr", (INPUT_DIM,), 3, 3, {**hparams("Fishr"), "nonlinear_classifier": True}, TinyFeaturizer)
    module = algorithm("Fishr").double()
    with pytest.raises(DomainBedError, match="built for 3 training domains but this batch holds 2"):
        module.update(minibatches_of(domain_batches(1)[0])[:2])
