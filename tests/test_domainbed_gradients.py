"""DomainBed's gradient-based algorithms RSC, ANDMask, SANDMask and IGA (with the Fishr paper's IGA ablations,
Tables 11-12) as ``fishr_lightning.domainbed`` modules (issue 26): K updates of ``trainer.fit`` end on the
weights of DomainBed's update written here from its formulas, in float64, with DomainBed's logged values;
their registry entries, state-dict keys and app configs are DomainBed's. None of them draws random numbers
(RSC's feature and batch drops are deterministic percentiles), so there is no distribution test."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from domainbed_harness import NUM_CLASSES, NUM_DOMAINS, TinyFeaturizer, domain_batches, fit, float64_state

from fishr_lightning.domainbed import (
    DomainBedError,
    build_algorithm,
    default_hparams,
    domainbed_state_dict,
    load_domainbed_state_dict,
    random_hparams,
)

NAMES = ("RSC", "ANDMask", "SANDMask", "IGA")


def build(name: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    hparams = {**default_hparams(name, "PACS"), "lr": 1e-2, "weight_decay": 1e-3, **options}
    return build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer, seed=seed)


class Logged(pl.Callback):
    """The values each update returned (DomainBed's ``update()`` dict)."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["domainbed"])


def reference_of(name: str, module, **options):
    """A copy of the module's initial networks (float64) and DomainBed's Adam for them, updated by hand."""
    reference = build(name, seed=1, **options).double()
    reference.load_state_dict(float64_state(module))
    return reference, torch.optim.Adam(reference.network.parameters(), lr=1e-2, weight_decay=1e-3)


def split(batch):
    x, y, domain = batch
    return [(x[domain == d], y[domain == d]) for d in range(NUM_DOMAINS)]


def assert_same_parameters(module, reference):
    for key, value in reference.network.state_dict().items():
        torch.testing.assert_close(module.network.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def assert_same_values(logged, expected):
    assert [sorted(v) for v in logged] == [sorted(v) for v in expected]
    for got, want in zip(logged, expected):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-13), key


# --- RSC -----------------------------------------------------------------------------------------------
def rsc_update(reference, optimizer, minibatches, f_drop: float, b_drop: float) -> dict[str, float]:
    """DomainBed's RSC.update (Huang et al. 2020, Eqs. 1-5 and its batch percentage)."""
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    onehot = F.one_hot(y, NUM_CLASSES).double()
    features = reference.featurizer(x)
    logits = reference.classifier(features)
    grads = torch.autograd.grad((logits * onehot).sum(), features)[0]
    # Each sample's (1 − f_drop)·100-th percentile, through DomainBed's torch.Tensor: float32.
    thresholds = torch.from_numpy(np.percentile(grads.numpy(), (1 - f_drop) * 100, axis=1)).float()
    keep_features = grads < thresholds.double()[:, None]
    muted = reference.classifier(features * keep_features)
    drops = (logits.softmax(1) * onehot).sum(1) - (muted.softmax(1) * onehot).sum(1)
    keep_samples = drops < np.percentile(drops.detach().numpy(), (1 - b_drop) * 100)
    keep = keep_features | keep_samples[:, None]
    assert 0 < keep.double().mean() < 1 and 0 < keep_samples.double().mean() < 1  # both masks at work
    loss = F.cross_entropy(reference.classifier(features * keep), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


def test_rsc_k_updates_end_on_domainbeds_weights():
    module, batches, logged = build("RSC"), domain_batches(steps=3), Logged()
    reference, optimizer = reference_of("RSC", module)
    expected = [rsc_update(reference, optimizer, split(batch), 1 / 3, 1 / 3) for batch in batches]
    fit(module, batches, callbacks=[logged])
    assert_same_parameters(module, reference)
    assert_same_values(logged.values, expected)


# --- ANDMask, SANDMask ---------------------------------------------------------------------------------
def and_mask(grads_DX: torch.Tensor, tau: float) -> torch.Tensor:
    """Parascandolo et al.: 1 where the domains' signs agree in a fraction ≥ tau (DomainBed: as float32)."""
    return (grads_DX.sign().mean(0).abs() >= tau).float()


def sand_mask(grads_DX: torch.Tensor, tau: float, k: float) -> torch.Tensor:
    """Shahtalebi et al.: max(0, tanh(k (agreement − tau) / var)); NaN variances and NaN entries 1e-17."""
    variance = grads_DX.var(0)
    variance = torch.where(variance.isnan(), torch.full_like(variance, 1e-17), variance)
    mask = torch.tanh(k / variance * (grads_DX.sign().mean(0).abs() - tau)).clamp_min(0)
    return torch.where(mask.isnan(), torch.full_like(mask, 1e-17), mask)


def masked_update(reference, optimizer, minibatches, mask_of) -> dict[str, float]:
    """DomainBed's ANDMask/SANDMask update: per parameter, mask · mean_e g_e / (1e-10 + mean(mask))."""
    parameters = list(reference.network.parameters())
    losses = [F.cross_entropy(reference.network(x), y) for x, y in minibatches]
    grads = [torch.autograd.grad(loss, parameters) for loss in losses]
    for parameter, domain_grads in zip(parameters, zip(*grads)):
        grads_DX = torch.stack(domain_grads)
        mask = mask_of(grads_DX)
        parameter.grad = mask * grads_DX.mean(0) * (1.0 / (1e-10 + mask.mean()))
    optimizer.step()
    return {"loss": sum(loss.item() / len(losses) for loss in losses)}


@pytest.mark.parametrize(
    ("name", "options"), [("ANDMask", {}), ("SANDMask", {"tau": 0.3, "k": 1e-4})], ids=["ANDMask", "SANDMask"]
)
def test_gradient_masks_k_updates_end_on_domainbeds_weights(name, options):
    module, batches, logged = build(name, **options), domain_batches(steps=3), Logged()
    hparams = module.hparams
    reference, optimizer = reference_of(name, module, **options)
    masks = []

    def mask_of(grads_DX):
        masks.append(and_mask(grads_DX, hparams["tau"]) if name == "ANDMask" else sand_mask(grads_DX, **options))
        return masks[-1]

    expected = [masked_update(reference, optimizer, split(batch), mask_of) for batch in batches]
    mask_values = torch.cat([mask.flatten() for mask in masks])
    assert (mask_values == 0).any() and (mask_values > 0).any()  # the masks keep some entries, not all
    if name == "SANDMask":
        assert ((mask_values > 0.01) & (mask_values < 0.99)).any()  # SAND-mask's smooth values at work
    fit(module, batches, callbacks=[logged])
    assert_same_parameters(module, reference)
    assert_same_values(logged.values, expected)
    if name == "SANDMask":
        assert module.update_count.tolist() == [len(batches)]  # DomainBed's buffer counts the updates


def test_sandmask_with_domainbeds_defaults_moves_no_weight():
    """DomainBed's quirk, reproduced and documented: tau=1 gives tanh(k·(1 − 1)/var) = 0 wherever the signs all
    agree and less elsewhere, so the mask is 0 and, without weight decay, the weights stay where they are."""
    module = build("SANDMask", weight_decay=0.0).double()
    before = float64_state(module)
    module.update(split(domain_batches(steps=1)[0]))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items() if k != "update_count")


# --- IGA and the Fishr paper's ablations -----------------------------------------------------------------
def iga_update(reference, optimizer, minibatches, step, state, options) -> tuple[dict[str, float], object]:
    """DomainBed's IGA.update, with the Fishr paper's ablations (Tables 11-12) by ``options``: the classifier's
    gradients only, an EMA (DomainBed's MovingAverage, 1/(1 − γ) corrected) of each domain's gradient, and
    Fishr + IGA (DomainBed's Fishr penalty on the classifier's per-sample gradients, its warm-up and Adam reset)."""
    on = reference.classifier if options.get("iga_classifier_only") else reference.network
    parameters = list(on.parameters())
    features = [reference.featurizer(x) for x, _ in minibatches]
    logits = [reference.classifier(z) for z in features]
    losses = [F.cross_entropy(logit, y) for logit, (_, y) in zip(logits, minibatches)]
    grads_EP = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters, create_graph=True)]) for loss in losses]
    )
    gamma = options.get("iga_ema", 0.0)
    if gamma:
        average = gamma * state.get("iga", torch.zeros_like(grads_EP)) + (1 - gamma) * grads_EP
        state["iga"] = average.detach()
        grads_EP = average / (1 - gamma)
    penalty = (grads_EP - grads_EP.mean(0)).square().sum()
    mean_loss = sum(losses) / len(losses)
    objective = mean_loss + 1000 * penalty
    values = {"loss": mean_loss.item(), "penalty": penalty.item()}
    if options.get("iga_fishr_lambda"):
        z, logit = torch.cat(features), torch.cat(logits)
        y = torch.cat([y for _, y in minibatches])
        delta = logit.softmax(1) - F.one_hot(y, NUM_CLASSES)
        sample_grads = torch.cat([(delta[:, :, None] * z[:, None, :]).flatten(1), delta], dim=1)  # W, then b
        variances, start, fishr_gamma = [], 0, options["iga_fishr_ema"]
        for e, (x, _) in enumerate(minibatches):
            g = sample_grads[start : start + len(x)]
            start += len(x)
            average = fishr_gamma * state.get(e, 0.0) + (1 - fishr_gamma) * (g - g.mean(0)).square().mean(0)
            state[e] = average.detach()
            variances.append(average / (1 - fishr_gamma))
        variance_EP = torch.stack(variances)
        fishr = (variance_EP - variance_EP.mean(0)).square().mean(1).mean()
        warm = step >= options["iga_fishr_penalty_anneal_iters"]
        objective = objective + (options["iga_fishr_lambda"] if warm else 0.0) * fishr
        values["fishr_penalty"] = fishr.item()
        if step == options["iga_fishr_penalty_anneal_iters"] != 0:  # DomainBed's Fishr re-creates Adam
            optimizer = torch.optim.Adam(reference.network.parameters(), lr=1e-2, weight_decay=1e-3)
    optimizer.zero_grad()
    objective.backward()
    optimizer.step()
    return values, optimizer


def test_domainbeds_iga_k_updates_end_on_the_references_weights():
    module, batches, logged = build("IGA"), domain_batches(steps=3), Logged()
    reference, optimizer = reference_of("IGA", module)
    expected, state = [], {}
    for step, batch in enumerate(batches):
        values, optimizer = iga_update(reference, optimizer, split(batch), step, state, {})
        expected.append(values)
    fit(module, batches, callbacks=[logged])
    assert_same_parameters(module, reference)
    assert_same_values(logged.values, expected)


def test_iga_ablations_resumed_from_a_checkpoint_end_on_the_uninterrupted_references_weights(tmp_path):
    """The Fishr paper's IGA ablations together: the classifier's gradients, their EMA, Fishr + IGA. Both
    averages live outside the state dict, so the checkpoint carries them; the Adam reset at the end of Fishr's
    warm-up falls after the resume."""
    options = {
        "iga_classifier_only": True,
        "iga_ema": 0.5,
        "iga_fishr_lambda": 10.0,
        "iga_fishr_penalty_anneal_iters": 3,
        "iga_fishr_ema": 0.9,
    }
    batches = domain_batches(steps=4)
    first, logged = build("IGA", **options), Logged()
    reference, optimizer = reference_of("IGA", first, **options)
    expected, state = [], {}
    for step, batch in enumerate(batches):
        values, optimizer = iga_update(reference, optimizer, split(batch), step, state, options)
        expected.append(values)
    trainer = fit(first, batches, max_steps=2, callbacks=[logged])
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = build("IGA", seed=3, **options).double()  # Lightning restores before 64-true converts the module
    # Lightning resumes the epoch at batch_idx 2 on a fresh iterator of the (non-resumable) loader: a loader
    # of the same length whose first items are the two batches left.
    fit(resumed, batches[2:] + batches[:2], ckpt_path=str(tmp_path / "two.ckpt"), max_steps=4, callbacks=[logged])
    assert_same_parameters(resumed, reference)
    assert_same_values(logged.values, expected)


def test_fishr_callback_is_refused_on_iga_and_bad_ablation_options_are_errors():
    # FishrCallback adds its penalty to training_step's returned loss, which manual optimisation never
    # backpropagates: it refuses the module (Fishr + IGA is the iga_fishr_lambda option).
    from fishr_lightning import FishrCallback
    from fishr_lightning.functional import FishrInputError

    with pytest.raises(FishrInputError, match="manual optimization"):
        fit(build("IGA"), domain_batches(steps=1), callbacks=[FishrCallback(head="classifier")])
    with pytest.raises(DomainBedError, match=r"iga_ema=1.0 is outside \[0, 1\)"):
        build("IGA", iga_ema=1.0)
    with pytest.raises(DomainBedError, match="needs a linear classifier"):
        build("IGA", iga_fishr_lambda=1.0, nonlinear_classifier=True)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_and_a_gradient_scaler_are_refused_with_the_reason(name):
    from types import SimpleNamespace

    module = build(name)
    module._trainer = SimpleNamespace(world_size=2, precision="32-true")
    with pytest.raises(DomainBedError, match=rf"{name} cannot run under DDP \(2 processes\): its .*devices=1"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(world_size=1, precision="16-mixed")
    if name in ("ANDMask", "SANDMask"):  # they set the gradients themselves: the scaler would unscale them
        with pytest.raises(DomainBedError, match="sets the parameters' gradients itself.*bf16-mixed"):
            module.on_fit_start()
    else:
        module.on_fit_start()


# --- registry, state dicts --------------------------------------------------------------------------------
# DomainBed's hparams_registry (computed once from facebookresearch/DomainBed's code): the defaults, and the
# draw of random_hparams(name, "PACS", seed=12345).
DOMAINBED_DEFAULTS = {
    "RSC": {"rsc_f_drop_factor": 1 / 3, "rsc_b_drop_factor": 1 / 3},
    "ANDMask": {"tau": 1},
    "SANDMask": {"tau": 1.0, "k": 10.0},
    "IGA": {"penalty": 1000},
}
DOMAINBED_DRAWS = {
    "RSC": {"rsc_f_drop_factor": 0.3796514725877613, "rsc_b_drop_factor": 0.4936124036183983},
    "ANDMask": {"tau": 0.5015688132325666},
    "SANDMask": {"tau": 0.0031376264651332697, "k": 46393.52464519265},
    "IGA": {"penalty": 11.719993091835159},
}
COMMON_DRAW = {"lr": 1.5535772737707375e-05, "batch_size": 38, "weight_decay": 3.0379553951653952e-05}


@pytest.mark.parametrize("name", NAMES)
def test_registry_and_state_dict_are_domainbeds(name):
    defaults, draw = default_hparams(name, "PACS"), random_hparams(name, "PACS", 12345)
    assert {k: defaults[k] for k in DOMAINBED_DEFAULTS[name]} == DOMAINBED_DEFAULTS[name]
    assert {k: draw[k] for k in DOMAINBED_DRAWS[name]} == pytest.approx(DOMAINBED_DRAWS[name], rel=1e-15)
    assert {k: draw[k] for k in COMMON_DRAW} == pytest.approx(COMMON_DRAW, rel=1e-15)
    assert not set(defaults) & {"iga_classifier_only", "iga_ema", "iga_fishr_lambda"}  # the ablations: options
    # DomainBed's keys for TinyFeaturizer: ERM's networks and their Sequential alias; SANDMask's update_count.
    networks = {f"featurizer.{layer}.{p}" for layer in ("hidden", "output") for p in ("weight", "bias")}
    networks |= {"classifier.weight", "classifier.bias"}
    networks |= {key.replace("featurizer.", "network.0.").replace("classifier.", "network.1.") for key in networks}
    module, other = build(name), build(name, seed=5)
    state = domainbed_state_dict(module)
    assert set(state) == networks | ({"update_count"} if name == "SANDMask" else set())
    load_domainbed_state_dict(other, state)
    assert all(torch.equal(other.state_dict()[key], value) for key, value in state.items())


# --- the app ------------------------------------------------------------------------------------------------
def test_app_runs_fishr_plus_iga_and_builds_each_algorithm_with_domainbeds_defaults(monkeypatch, tmp_path):
    """One app run of the group's most complex case (IGA with the classifier-only, EMA and Fishr + IGA options,
    recorded with the run's hyperparameters); the other configs compose and build their class with the registry's
    defaults (no training)."""
    import json
    import sys

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from fishr_lightning.app.training.run import CONFIG_MODULE, build_module, domainbed_options, main, resolve_hparams
    from fishr_lightning.domainbed.gradient_masks import ANDMask, SANDMask
    from fishr_lightning.domainbed.iga import IGA
    from fishr_lightning.domainbed.rsc import RSC

    ablations = ["+hparams.iga_classifier_only=true", "+hparams.iga_ema=0.9", "+hparams.iga_fishr_lambda=10"]
    ablations.append("+hparams.iga_fishr_penalty_anneal_iters=1")
    run_dir = tmp_path / "run"
    argv = ["fishr-train", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=csv"]
    argv += [f"hydra.run.dir={run_dir}", "algorithm=iga", "dataset.samples_per_domain=200", "batch_size=8"]
    monkeypatch.setattr(sys, "argv", [*argv, "steps=3", "checkpoint_freq=2", *ablations])
    GlobalHydra.instance().clear()
    try:
        main()
    finally:
        GlobalHydra.instance().clear()
    last = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["args"]["algorithm"] == "IGA" and (run_dir / "done").exists()
    assert last["penalty"] > 0 and last["fishr_penalty"] > 0 and last["loss"] > 0  # IGA's and Fishr's, DomainBed's keys
    assert {k: last["hparams"][k] for k in ("iga_classifier_only", "iga_ema", "iga_fishr_lambda")} == {
        "iga_classifier_only": True,
        "iga_ema": 0.9,
        "iga_fishr_lambda": 10,
    }

    classes = {"rsc": RSC, "andmask": ANDMask, "sandmask": SANDMask, "iga": IGA}
    for config, cls in classes.items():
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"algorithm={config}", "dataset=pacs", "backbone=mlp"])
        GlobalHydra.instance().clear()
        hparams = resolve_hparams(cfg)
        assert hparams == default_hparams(cls.__name__, "PACS")
        with open_dict(cfg):
            cfg.hparams, cfg.num_train_domains = hparams, 3  # as run.py sets them
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        module = build_module(backbone, (3, 8, 8), 7, hparams, None, domainbed_options(cfg))
        assert type(module) is cls and dict(module.hparams) == hparams and module.num_domains == 3
