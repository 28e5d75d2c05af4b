"""TRM and Transfer (issue 27) equal DomainBed's ``TRM.update`` and ``Transfer.update``, written here from its
code: TRM's per-domain classifiers (outside the state dict, kept across a resume), its Neumann inverse-Hessian
estimate (here from the explicit Hessian) and GroupDRO weights; Transfer's adversarial classifier, its ascent and
projection onto the ball around the classifier."""

from __future__ import annotations

import copy
import json
import sys

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
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fishr_lightning.app.training.run import CONFIG_MODULE, main, resolve_hparams
from fishr_lightning.domainbed import build_algorithm, default_hparams, domainbed_state_dict, load_domainbed_state_dict
from fishr_lightning.domainbed.hparams_registry import hparams_for

TRM_HPARAMS = {**default_hparams("TRM", "PACS"), "lr": 1e-2, "iters": 1, "cos_lambda": 0.1, "groupdro_eta": 0.5}
TRANSFER_HPARAMS = {**default_hparams("Transfer", "PACS"), "lr": 1e-2, "lr_d": 0.5, "d_steps_per_g": 2, "delta": 0.02}
TINY_KEYS = {f"featurizer.{layer}.{p}" for layer in ("hidden", "output") for p in ("weight", "bias")}


def record_values(module, values):
    training_step = module.training_step

    def wrapped(batch, batch_idx):
        output = training_step(batch, batch_idx)
        values.append(output["domainbed"])
        return output

    module.training_step = wrapped


def neumann_estimate(v0, layer, x, y):
    """DomainBed's TRM.neum from the explicit Hessian H of the layer's cross-entropy in its weight: with
    v_k = (I − H)^k v0, its in-place ``v -= hv`` on ``h_estimate``'s tensor makes the estimate 2 v_1 + v_2 + … + v_k,
    stopped after the first k whose estimate has an entry above 10 (k ≤ 10)."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    hessian = torch.autograd.functional.hessian(lambda w: F.cross_entropy(F.linear(x, w, bias), y), weight)
    hessian = hessian.reshape(weight.numel(), weight.numel())
    terms, v = [], v0.detach()
    for _ in range(10):
        v = v - hessian @ v
        terms.append(v)
        estimate = 2 * terms[0] + sum(terms[1:], torch.zeros_like(v))
        if estimate.abs().max() > 10:
            break
    return estimate


def trm_reference(module, batches, hparams):
    """DomainBed's TRM.update, K times, from the module's initial networks in float64; the logged values."""
    featurizer, classifier = copy.deepcopy(module.featurizer).double(), copy.deepcopy(module.classifier).double()
    clist = [copy.deepcopy(c).double() for c in module.clist]
    olist = [torch.optim.SGD(c.parameters(), lr=0.1) for c in clist]
    optimizer_f = torch.optim.Adam(featurizer.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    optimizer_c = torch.optim.Adam(classifier.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    alpha = torch.ones(NUM_DOMAINS, NUM_DOMAINS) - torch.eye(NUM_DOMAINS)  # float32, as DomainBed's
    logged = []
    for count, batch in enumerate(batches):
        minibatches = minibatches_of(batch)
        all_x, all_y = batch[0], batch[1]
        features = featurizer(all_x)
        loss = F.cross_entropy(classifier(features), all_y)
        objective = loss
        if count >= hparams["iters"]:
            alpha /= alpha.sum(1, keepdim=True)
            split = [(features[batch[2] == e], y) for e, (_, y) in enumerate(minibatches)]
            for _ in range(30):
                loss_erm = sum(F.cross_entropy(clist[j](z.detach()), y) for j, (z, y) in enumerate(split))
                for opt in olist:
                    opt.zero_grad()
                loss_erm.backward()
                for opt in olist:
                    opt.step()
            swap = 0.0
            for q, (z_q, y_q) in enumerate(split):
                grad_q = torch.autograd.grad(F.cross_entropy(clist[q](z_q), y_q), clist[q].weight, create_graph=True)[0]
                risks = {i: F.cross_entropy(clist[q](z), y) for i, (z, y) in enumerate(split) if i != q}
                weights = {i: alpha[q, i].clone() for i in risks}
                loss_p = sum(risks[i] * weights[i] for i in risks)
                grad_p = torch.autograd.grad(loss_p, clist[q].weight, create_graph=True)[0].flatten().detach()
                inverse_hvp = neumann_estimate(grad_p, clist[q], z_q.detach(), y_q)
                for i in risks:
                    alpha[q, i] *= torch.exp(hparams["groupdro_eta"] * (risks[i] * weights[i]).detach())
                # DomainBed weighs by alpha[Q, i].data: autograd keeps that view of alpha, so the backward multiplies by
                # the weights updated just above (the forward by the old ones).
                loss_p = loss_p.detach() + sum(
                    risks[i] * alpha[q, i].item() - (risks[i] * alpha[q, i].item()).detach() for i in risks
                )
                swap = swap + (loss_p - hparams["cos_lambda"] * (inverse_hvp @ grad_q.flatten()))
            objective = loss + swap / NUM_DOMAINS
        optimizer_c.zero_grad()
        optimizer_f.zero_grad()
        objective.backward()
        optimizer_f.step()
        optimizer_c.step()
        logged.append({"nll": loss.item(), "trm_loss": objective.item() - loss.item()})
    return featurizer, classifier, clist, alpha, logged


def test_trm_k_updates_end_on_domainbeds_weights_through_a_resume(tmp_path):
    torch.manual_seed(0)
    module = build_algorithm("TRM", (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, TRM_HPARAMS, featurizer=TinyFeaturizer)
    batches = domain_batches(steps=4)
    featurizer, classifier, clist, alpha, logged = trm_reference(module, batches, TRM_HPARAMS)
    # DomainBed's keys: the per-domain classifiers are outside the state dict.
    assert set(domainbed_state_dict(module)) == TINY_KEYS | {"classifier.weight", "classifier.bias", "update_count"}
    values = []
    record_values(module, values)
    # Epochs of two updates: Lightning restarts a plain loader at an epoch's start, so the checkpoint ends one.
    trainer = fit(module, batches[:2], root=str(tmp_path), max_steps=-1, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(1)  # other initial weights, the per-domain classifiers included: the checkpoint's win
    resumed = build_algorithm("TRM", (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, TRM_HPARAMS, featurizer=TinyFeaturizer)
    resumed.double()  # Lightning loads a checkpoint before its precision plugin converts: no float32 rounding
    record_values(resumed, values)
    resumed_trainer = fit(resumed, batches[2:], ckpt_path=str(tmp_path / "half.ckpt"), max_steps=-1, max_epochs=2)
    assert resumed_trainer.global_step == 4
    state = domainbed_state_dict(resumed)
    assert state["update_count"].item() == 4
    expected = {**{f"featurizer.{k}": v for k, v in featurizer.state_dict().items()}, **{
        f"classifier.{k}": v for k, v in classifier.state_dict().items()}}  # fmt: skip
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(resumed.clist, clist):
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resumed.alpha, alpha, rtol=1e-6, atol=0)  # float32 on both sides
    assert resumed.alpha.dtype == torch.float32 and resumed.clist[0].weight.dtype == torch.float64
    for got, want in zip(values, logged, strict=True):
        assert got == pytest.approx(want, rel=1e-9)


def distance(h1, h2):  # DomainBed's misc.distance
    return torch.sqrt(sum(torch.norm(h1.state_dict()[k] - h2.state_dict()[k]) ** 2 for k in h1.state_dict()))


def proj(delta, adv_h, h):  # DomainBed's misc.proj
    dist = distance(adv_h, h)
    if dist > delta:
        for param_h, param_adv_h in zip(h.parameters(), adv_h.parameters()):
            param_adv_h.data = param_h + delta / dist * (param_adv_h - param_h)


def transfer_reference(module, batches, hparams):
    featurizer, classifier = copy.deepcopy(module.featurizer).double(), copy.deepcopy(module.classifier).double()
    adv_classifier = copy.deepcopy(module.adv_classifier).double()
    if hparams["gda"]:
        optimizer = torch.optim.SGD(adv_classifier.parameters(), lr=hparams["lr"])
    else:
        params = [*featurizer.parameters(), *classifier.parameters()]
        optimizer = torch.optim.Adam(params, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    adv_opt = torch.optim.SGD(adv_classifier.parameters(), lr=hparams["lr_d"])

    def loss_gap(minibatches):
        max_loss, min_loss = torch.tensor([-float("inf")]), torch.tensor([float("inf")])
        for x, y in minibatches:
            loss = F.cross_entropy(adv_classifier(featurizer(x)), y)
            max_loss, min_loss = loss if loss > max_loss else max_loss, loss if loss < min_loss else min_loss
        return max_loss - min_loss

    logged, projected = [], 0
    for x, y, domain in batches:
        minibatches = minibatches_of((x, y, domain))
        loss = F.cross_entropy(classifier(featurizer(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gap = hparams["t_lambda"] * loss_gap(minibatches)
        optimizer.zero_grad()
        gap.backward()
        optimizer.step()
        adv_classifier.load_state_dict(classifier.state_dict())
        for _ in range(hparams["d_steps_per_g"]):
            adv_opt.zero_grad()
            gap = -hparams["t_lambda"] * loss_gap(minibatches)
            gap.backward()
            adv_opt.step()
            projected += bool(distance(adv_classifier, classifier) > hparams["delta"])
            proj(hparams["delta"], adv_classifier, classifier)
        logged.append({"loss": loss.item(), "gap": -gap.item()})
    state = {f"{name}.{k}": v for name, net in (("featurizer", featurizer), ("classifier", classifier),
             ("adv_classifier", adv_classifier)) for k, v in net.state_dict().items()}  # fmt: skip
    return state, logged, projected


def test_transfer_k_updates_end_on_domainbeds_weights_and_gda_moves_only_the_adversary():
    torch.manual_seed(0)
    module = build_algorithm("Transfer", (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, TRANSFER_HPARAMS, featurizer=TinyFeaturizer)  # fmt: skip
    batches = domain_batches(steps=3)
    initial = float64_state(module)
    expected, logged, projected = transfer_reference(module, batches, TRANSFER_HPARAMS)
    assert projected > 0  # the projection onto the ball is exercised
    values = []
    record_values(module, values)
    assert fit(module, batches).global_step == 3  # one update, one step, though four optimizer steps
    state = domainbed_state_dict(module)
    assert set(state) == set(expected) | {"update_count"}
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-12)
    for got, want in zip(values, logged, strict=True):
        assert got == pytest.approx(want, rel=1e-9)

    # gda (every random draw of DomainBed's registry): 'optimizer' is SGD on the adversary, by hand.
    hparams = {**TRANSFER_HPARAMS, "gda": True}
    module = build_algorithm("Transfer", (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer)
    load_domainbed_state_dict(module.double(), initial)
    expected, _, _ = transfer_reference(module, batches[:2], hparams)
    for batch in batches[:2]:
        module.update(minibatches_of(batch))
    for key, value in expected.items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-9, atol=1e-12)
        if not key.startswith("adv_classifier"):
            assert torch.equal(value, initial[key])


def test_the_registry_is_domainbeds():
    # DomainBed's hparams_registry: defaults, and random_hparams(name, "PACS", misc.seed_hash(1, 0)) (computed with
    # its code): gda is True in every draw.
    names = {"TRM": ("cos_lambda", "iters", "groupdro_eta", "batch_size"),
             "Transfer": ("t_lambda", "delta", "d_steps_per_g", "weight_decay_d", "gda", "beta1", "lr_d")}  # fmt: skip
    assert [default_hparams("TRM", "PACS")[k] for k in names["TRM"]] == [1e-4, 200, 1e-2, 32]
    assert [hparams_for("TRM", "PACS", 1, 0)[k] for k in names["TRM"]] == pytest.approx(
        [2.2217779996347212e-05, 16, 0.01297606872689568, 39]
    )
    assert [default_hparams("Transfer", "PACS")[k] for k in names["Transfer"]] == [1.0, 2.0, 10, 0.0, False, 0.5, 1e-3]
    assert [hparams_for("Transfer", "PACS", 1, 0)[k] for k in names["Transfer"]] == pytest.approx(
        [0.26535225943004515, 2.702212143805776, 1, 0.00010096814830489473, True, 0.5, 6.700771289296927e-05]
    )


def composed(overrides: list[str]):
    """The config as the app sees it (HydraConfig included)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg


def test_the_app_trains_trm_and_takes_rdms_batch_size_from_its_registry(monkeypatch, tmp_path):
    # One app run for the three (TRM, the most complex): its transfer risk from the second update on.
    run_dir = tmp_path / "trm"
    argv = ["fishr-train", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=csv",
            f"hydra.run.dir={run_dir}", "dataset.samples_per_domain=60", "batch_size=8", "algorithm=trm", "steps=3",
            "checkpoint_freq=2", "+hparams.iters=1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    try:
        main()
    finally:
        GlobalHydra.instance().clear()
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert records[-1]["args"]["algorithm"] == "TRM" and records[-1]["hparams"]["iters"] == 1
    assert records[-1]["trm_loss"] > 0 and records[-1]["nll"] > 0  # the transfer risk, DomainBed's keys
    # RDM's registry sets batch_size per dataset, and the app trains with it (DomainBed's 88 on PACS) unless
    # batch_size= is given. (Every DomainBed config's build is tests/test_app_domainbed.py's.)
    assert resolve_hparams(composed(["algorithm=rdm", "dataset=pacs"]))["batch_size"] == 88
    assert resolve_hparams(composed(["algorithm=rdm", "dataset=terra_incognita"]))["batch_size"] == 40
    assert resolve_hparams(composed(["algorithm=rdm", "dataset=pacs", "batch_size=12"]))["batch_size"] == 12
