"""DomainBed's DANN, CDANN, SagNet and SelfReg (issue 26): K updates of ``trainer.fit`` end on the weights of
DomainBed's update, written here from its formulas (for SagNet and SelfReg given the module's draws), the
draws have DomainBed's distribution and depend only on ``(seed, update)``, a resumed fit equals the
uninterrupted one, the state dicts have DomainBed's keys, the hyperparameters are its registry's, and the app
trains them."""

from __future__ import annotations

import copy

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
    float64_state,
    minibatches_of,
    one_thread,  # noqa: F401 (one_thread: autouse)
)
from lightning.pytorch import Callback
from torch import autograd, nn

from fishr_lightning.domainbed import (
    DomainBedAlgorithm,
    build_algorithm,
    default_hparams,
    domainbed_state_dict,
    load_domainbed_state_dict,
    random_hparams,
)

DANN_HPARAMS = {"grad_penalty": 0.5, "lambda": 0.3, "lr_g": 1e-2, "lr_d": 2e-2, "weight_decay_d": 1e-3}
DANN_HPARAMS |= {"weight_decay_g": 1e-4, "mlp_width": 16, "mlp_depth": 3, "beta1": 0.5, "d_steps_per_g_step": 1}
OVERRIDES = {"DANN": DANN_HPARAMS, "CDANN": DANN_HPARAMS, "SagNet": {"lr": 1e-2, "sag_w_adv": 0.5}}
OVERRIDES["SelfReg"] = {"lr": 1e-2}


def build(name: str, seed: int = 0) -> DomainBedAlgorithm:
    torch.manual_seed(0)  # the same initial weights for every module of a name
    hparams = {**default_hparams(name, "PACS"), **OVERRIDES[name]}
    return build_algorithm(name, (INPUT_DIM,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer, seed=seed)


def copy_of(module: nn.Module, *names: str) -> nn.ModuleDict:
    """The reference's own float64 networks, copies of the module's (the same initial weights)."""
    return nn.ModuleDict({name: copy.deepcopy(getattr(module, name)) for name in names}).double()


class LoggedValues(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["domainbed"])


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-10, atol=1e-12, msg=key)


# --- DANN, CDANN: no draws; K updates equal DomainBed's ---------------------------------------------------------------
def dann_reference(nets: nn.ModuleDict, hparams: dict, conditional: bool, class_balance: bool, batches) -> list:
    """DomainBed's AbstractDANN.update, K times: discriminator and generator Adams with betas (beta1, 0.9)."""
    betas = (hparams["beta1"], 0.9)
    disc_params = [*nets["discriminator"].parameters(), *nets["class_embeddings"].parameters()]
    disc_opt = torch.optim.Adam(disc_params, lr=hparams["lr_d"], weight_decay=hparams["weight_decay_d"], betas=betas)
    gen_params = [*nets["featurizer"].parameters(), *nets["classifier"].parameters()]
    gen_opt = torch.optim.Adam(gen_params, lr=hparams["lr_g"], weight_decay=hparams["weight_decay_g"], betas=betas)
    logged = []
    for update_count, batch in enumerate(batches, start=1):
        minibatches = minibatches_of(batch)
        x, y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
        z = nets["featurizer"](x)
        disc_input = z + nets["class_embeddings"](y) if conditional else z
        disc_out = nets["discriminator"](disc_input)
        domain = torch.cat([torch.full((len(x_e),), e) for e, (x_e, _) in enumerate(minibatches)])
        if class_balance:  # 1 / (n_y · K), K = F.one_hot's width: the largest label + 1
            counts = F.one_hot(y).sum(dim=0)
            weights = 1.0 / (counts[y] * counts.shape[0]).float()
            disc_loss = (weights * F.cross_entropy(disc_out, domain, reduction="none")).sum()
        else:
            disc_loss = F.cross_entropy(disc_out, domain)
        input_grad = autograd.grad(F.cross_entropy(disc_out, domain, reduction="sum"), [disc_input], create_graph=True)
        disc_loss = disc_loss + hparams["grad_penalty"] * (input_grad[0] ** 2).sum(dim=1).mean()
        d = hparams["d_steps_per_g_step"]
        if update_count % (1 + d) < d:
            disc_opt.zero_grad()
            disc_loss.backward()
            disc_opt.step()
            logged.append({"disc_loss": disc_loss.item()})
        else:
            gen_loss = F.cross_entropy(nets["classifier"](z), y) - hparams["lambda"] * disc_loss
            disc_opt.zero_grad()
            gen_opt.zero_grad()
            gen_loss.backward()
            gen_opt.step()
            logged.append({"gen_loss": gen_loss.item()})
    return logged


@pytest.mark.parametrize("name", ["DANN", "CDANN"])
def test_dann_and_cdann_k_updates_of_trainer_fit_end_on_domainbeds_weights(name):
    module, batches = build(name), domain_batches(steps=3)
    if name == "CDANN":  # the discriminator step's batch lacks the last class: K = 2, not num_classes
        x, y, domain = batches[1]
        batches[1] = (x, y.clamp(max=1), domain)
    nets = copy_of(module, "featurizer", "classifier", "discriminator", "class_embeddings")
    # d_steps_per_g_step=1: update_count 1, 2, 3 -> generator, discriminator, generator steps
    expected = dann_reference(nets, module.hparams, name == "CDANN", name == "CDANN", batches)
    assert [list(values) for values in expected] == [["gen_loss"], ["disc_loss"], ["gen_loss"]]
    logged = LoggedValues()
    trainer = fit(module, batches, callbacks=[logged])
    assert trainer.global_step == 3 and module.update_count.item() == 3
    assert_same_state({k: v for k, v in module.state_dict().items() if k != "update_count"}, nets.state_dict())
    assert logged.values == [pytest.approx(values, rel=1e-10) for values in expected]


# --- SagNet, SelfReg: DomainBed's update given the module's draws -------------------------------------------------------
def sagnet_reference_update(nets, optimizers, minibatches, weight_adv, generator=None) -> dict:
    """DomainBed's SagNet.update; its torch.rand/torch.randperm from ``generator`` (None: the global RNG)."""

    def randomize(x, what, eps=1e-5):
        alpha = torch.rand(x.shape[0], 1, generator=generator)
        mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        x = (x - mean) / (var + eps).sqrt()
        idx_swap = torch.randperm(x.shape[0], generator=generator)
        if what == "style":
            mean = alpha * mean + (1 - alpha) * mean[idx_swap]
            var = alpha * var + (1 - alpha) * var[idx_swap]
        else:
            x = x[idx_swap].detach()
        return x * (var + eps).sqrt() + mean

    f, c, s = nets["network_f"], nets["network_c"], nets["network_s"]
    opt_f, opt_c, opt_s = optimizers
    x, y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
    opt_f.zero_grad()
    opt_c.zero_grad()
    loss_c = F.cross_entropy(c(randomize(f(x), "style")), y)
    loss_c.backward()
    opt_f.step()
    opt_c.step()
    opt_s.zero_grad()
    loss_s = F.cross_entropy(s(randomize(f(x), "content")), y)
    loss_s.backward()
    opt_s.step()
    opt_f.zero_grad()
    loss_adv = weight_adv * -F.log_softmax(s(randomize(f(x), "content")), dim=1).mean(1).mean()
    loss_adv.backward()
    opt_f.step()
    return {"loss_c": loss_c.item(), "loss_s": loss_s.item(), "loss_adv": loss_adv.item()}


def selfreg_reference_update(nets, optimizer, minibatches, lam_random_state, generator) -> dict:
    """DomainBed's SelfReg.update, its loops as written; λ from ``lam_random_state``, permutations from ``generator``."""
    all_x, all_y = torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])
    lam = lam_random_state.beta(0.5, 0.5)
    batch_size = all_y.size()[0]
    with torch.no_grad():
        sorted_y, indices = torch.sort(all_y)
        sorted_x = torch.zeros_like(all_x)
        for idx, order in enumerate(indices):
            sorted_x[idx] = all_x[order]
        intervals, ex = [], 0
        for idx, val in enumerate(sorted_y):
            if ex == val:
                continue
            intervals.append(idx)
            ex = val
        intervals.append(batch_size)
        all_x, all_y = sorted_x, sorted_y
    feat = nets["featurizer"](all_x)
    proj = nets["cdpl"](feat)
    output = nets["classifier"](feat)
    output_2, feat_2 = torch.zeros_like(output), torch.zeros_like(proj)
    output_3, feat_3 = torch.zeros_like(output), torch.zeros_like(proj)
    ex = 0
    for end in intervals:
        shuffle_indices = torch.randperm(end - ex, generator=generator) + ex
        shuffle_indices2 = torch.randperm(end - ex, generator=generator) + ex
        for idx in range(end - ex):
            output_2[idx + ex] = output[shuffle_indices[idx]]
            feat_2[idx + ex] = proj[shuffle_indices[idx]]
            output_3[idx + ex] = output[shuffle_indices2[idx]]
            feat_3[idx + ex] = proj[shuffle_indices2[idx]]
        ex = end
    output_3 = lam * output_2 + (1 - lam) * output_3
    feat_3 = lam * feat_2 + (1 - lam) * feat_3
    mse = nn.MSELoss()
    regularizer_ind = mse(output, output_2) + 0.3 * mse(feat, feat_2)
    regularizer_hdl = mse(output, output_3) + 0.3 * mse(feat, feat_3)
    cl_loss = F.cross_entropy(output, all_y)
    loss = cl_loss + min(cl_loss.item(), 1.0) * (lam * regularizer_ind + (1 - lam) * regularizer_hdl)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


class Reference:
    """DomainBed's update for ``name`` on the reference's own copies of ``module``'s networks and optimizers."""

    def __init__(self, name: str, module: DomainBedAlgorithm) -> None:
        self.name, self.hparams = name, module.hparams
        names = ("network_f", "network_c", "network_s") if name == "SagNet" else ("featurizer", "classifier", "cdpl")
        self.nets = copy_of(module, *names)
        self.initial = copy.deepcopy(self.nets.state_dict())
        self.restart()

    def restart(self) -> None:
        """The initial weights and new optimizers: a fresh run's first update comes next."""
        self.nets.load_state_dict(self.initial)
        adam = {"lr": self.hparams["lr"], "weight_decay": self.hparams["weight_decay"]}
        if self.name == "SagNet":  # DomainBed's optimizer_f, optimizer_c, optimizer_s
            self.optimizers = [torch.optim.Adam(network.parameters(), **adam) for network in self.nets.values()]
        else:  # ERM's Adam on its network: cdpl in no optimizer, as DomainBed's SelfReg
            parameters = [*self.nets["featurizer"].parameters(), *self.nets["classifier"].parameters()]
            self.optimizers = torch.optim.Adam(parameters, **adam)

    def update(self, minibatches, lam_random_state, generator) -> dict:
        if self.name == "SagNet":
            return sagnet_reference_update(
                self.nets, self.optimizers, minibatches, self.hparams["sag_w_adv"], generator
            )
        return selfreg_reference_update(self.nets, self.optimizers, minibatches, lam_random_state, generator)


def module_draws(module: DomainBedAlgorithm, update: int) -> tuple[np.random.RandomState, torch.Generator]:
    """The streams the module draws from at ``update``: SelfReg's λ and both algorithms' permutations and α."""
    module.update_index = update
    salt = type(module).__name__.lower()
    return module.random_state(salt), module.generator(salt)


@pytest.mark.parametrize("name", ["SagNet", "SelfReg"])
def test_sagnet_and_selfreg_updates_equal_domainbeds_given_the_draws_and_resume_exactly(name, tmp_path):
    module, batches = build(name), domain_batches(steps=4)
    reference = Reference(name, module)
    expected = [reference.update(minibatches_of(batch), *module_draws(build(name), step)) for step, batch in
                enumerate(batches)]  # fmt: skip
    logged = LoggedValues()
    uninterrupted = fit(module, batches, callbacks=[logged])
    assert uninterrupted.global_step == 4  # one DomainBed update one step, however many optimizer steps
    actual = {k: v for k, v in module.state_dict().items() if not k.startswith("network.")}  # ERM's aliases
    assert_same_state(actual, reference.nets.state_dict())
    assert logged.values == [pytest.approx(values, rel=1e-10) for values in expected]
    if name == "SelfReg":  # cdpl's weights never move, its BatchNorm statistics do
        initial = build(name)
        assert torch.equal(module.cdpl[0].weight, initial.cdpl[0].weight.double())
        assert not torch.equal(module.cdpl[1].running_mean, initial.cdpl[1].running_mean.double())

    # Interrupted after 2 updates, resumed from the checkpoint: the uninterrupted fit's weights and optimizer states.
    # Lightning resumes a plain (not resumable) loader by counting on from the checkpoint's batch index: the resumed
    # loader yields the remaining batches first. The module is float64 before the checkpoint loads (Lightning loads
    # the weights before 64-true converts the module).
    interrupted = build(name)
    fit(interrupted, batches, root=str(tmp_path), max_steps=2).save_checkpoint(tmp_path / "two.ckpt")
    resumed = build(name).double()
    trainer = fit(resumed, batches[2:] + batches[:2], ckpt_path=str(tmp_path / "two.ckpt"), root=str(tmp_path))
    assert trainer.global_step == 4
    assert_same_state(resumed.state_dict(), module.state_dict())
    for optimizer, uninterrupted_optimizer in zip(trainer.optimizers, uninterrupted.optimizers, strict=True):
        states = zip(optimizer.state.values(), uninterrupted_optimizer.state.values(), strict=True)
        for state, expected_state in states:
            assert_same_state(state, expected_state)


@pytest.mark.parametrize("name", ["SagNet", "SelfReg"])
def test_sagnet_and_selfreg_draws_have_domainbeds_distribution_and_depend_on_seed_and_update_only(name):
    """The one-step update over many seeds: its mean (logged values and weights) within noise of DomainBed's over
    as many of its own draws (its calls, on RNGs seeded apart); the same (seed, update) draws the same."""
    draws = 60
    module, batch = build(name).double(), minibatches_of(domain_batches(steps=1)[0])
    initial, reference = float64_state(module), Reference(name, module)

    def module_update(seed: int, update: int = 0) -> torch.Tensor:
        module.load_state_dict(initial)
        module.__dict__.pop("_own_optimizers", None)  # fresh Adams, as a fresh run's first update
        module.seed, module.update_index = seed, update
        values = module.update(batch)
        return torch.cat([torch.tensor(list(values.values()))] + [p.detach().flatten() for p in module.parameters()])

    def reference_update(seed: int) -> torch.Tensor:
        reference.restart()
        values = reference.update(
            batch, np.random.RandomState(10_000 + seed), torch.Generator().manual_seed(10_000 + seed)
        )
        parameters = [p.detach().flatten() for p in reference.nets.parameters()]
        return torch.cat([torch.tensor(list(values.values()))] + parameters)

    ours = torch.stack([module_update(seed) for seed in range(draws)])
    domainbeds = torch.stack([reference_update(seed) for seed in range(draws)])
    # |Δmean| / its standard error per coordinate (floored: Adam's first step is nearly ±lr whatever the draws)
    standard_error = ((ours.var(0) + domainbeds.var(0)) / draws).sqrt().clamp_min(1e-8)
    z = (ours.mean(0) - domainbeds.mean(0)).abs() / standard_error
    assert (ours.std(0)[: 3 if name == "SagNet" else 1] > 1e-5).all()  # the logged losses depend on the draws
    assert z.max() < 5.0, f"max |Δmean| / standard error = {z.max():.2f}"
    # the same (seed, update) draws the same; another update of the same seed draws anew
    assert torch.equal(module_update(7, update=3), module_update(7, update=3))
    assert not torch.equal(module_update(7, update=3), module_update(7, update=4))


# --- state dicts, hyperparameters, the app ---------------------------------------------------------------------------
DISCRIMINATOR = [f"discriminator.{layer}.{p}" for layer in ("input", "hiddens.0", "output") for p in ("weight", "bias")]
TINY = [f"{{}}.{layer}.{p}" for layer in ("hidden", "output") for p in ("weight", "bias")]
HEAD = ["{}.weight", "{}.bias"]
BATCHNORM = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
# DomainBed's algorithm.state_dict() keys with TinyFeaturizer as networks.Featurizer (checked against its classes).
DOMAINBED_KEYS = {
    "DANN": {"update_count", *(k.format("featurizer") for k in TINY), *(k.format("classifier") for k in HEAD)}
    | {*DISCRIMINATOR, "class_embeddings.weight"},
    "SagNet": {k.format("network_f") for k in TINY} | {k.format(n) for k in HEAD for n in ("network_c", "network_s")},
    "SelfReg": {k.format(n) for n in ("featurizer", "network.0") for k in TINY}
    | {k.format(n) for n in ("classifier", "network.1") for k in HEAD}
    | {f"cdpl.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    | {f"cdpl.{i}.{p}" for i in (1, 4, 7) for p in BATCHNORM},
}
DOMAINBED_KEYS["CDANN"] = DOMAINBED_KEYS["DANN"]


@pytest.mark.parametrize("name", ["DANN", "CDANN", "SagNet", "SelfReg"])
def test_state_dicts_have_domainbeds_keys_and_round_trip(name):
    module = build(name)
    state = domainbed_state_dict(module)
    assert set(state) == DOMAINBED_KEYS[name]
    other = build(name, seed=1)
    for parameter in other.parameters():
        parameter.data.add_(1.0)
    load_domainbed_state_dict(other, state)
    assert all(torch.equal(other.state_dict()[key], value) for key, value in state.items())
    assert other.featurizer is getattr(other, "network_f", other.featurizer)  # SagNet's properties, no extra keys
    assert other.ddp_refusal and other.ddp_refusal != DomainBedAlgorithm.ddp_refusal  # its own reason


# DomainBed's hparams_registry: default_hparams / random_hparams(algorithm, dataset, seed), computed from its code.
DOMAINBED_DRAWS = {
    ("DANN", "PACS", 3): {
        "lambda": 0.21793885982071107,
        "weight_decay_d": 0.00048493901668857585,
        "d_steps_per_g_step": 1,
        "grad_penalty": 0.2589397101638643,
        "beta1": 0.0,
        "mlp_width": 86,
        "mlp_depth": 3,
        "mlp_dropout": 0.1,
        "lr": 3.308121908308078e-05,
        "lr_g": 1.2533707286206367e-05,
        "lr_d": 3.564870933390295e-05,
        "weight_decay_g": 0.0017789892580460866,
    },
    ("CDANN", "ColoredMNIST", 5): {  # a small-image dataset: lr_g, lr_d from 10^U(-4.5,-2.5), weight_decay_g 0
        "lambda": 9.431634821745186,
        "weight_decay_d": 0.00010106044209918027,
        "d_steps_per_g_step": 4,
        "grad_penalty": 0.21084217318838322,
        "beta1": 0.0,
        "mlp_width": 124,
        "mlp_depth": 5,
        "mlp_dropout": 0.1,
        "lr": 0.0009198973511521523,
        "lr_g": 7.452650992651234e-05,
        "lr_d": 0.0019879882846961217,
        "weight_decay_g": 0.0,
    },
    ("SagNet", "DomainNet", 2): {"sag_w_adv": 0.01768077039075001, "lr": 1.3397675113647168e-05},
    ("SelfReg", "OfficeHome", 4): {"lr": 2.3816480430034047e-05},
}


def test_hyperparameters_are_domainbeds_registry():
    dann = {"lambda": 1.0, "weight_decay_d": 0.0, "d_steps_per_g_step": 1, "grad_penalty": 0.0, "beta1": 0.5}
    dann |= {"mlp_width": 256, "mlp_depth": 3, "mlp_dropout": 0.0, "lr_g": 5e-5, "lr_d": 5e-5, "weight_decay_g": 0.0}
    common = set(default_hparams("ERM", "PACS"))
    for name in ("DANN", "CDANN"):
        assert default_hparams(name, "PACS") == {**default_hparams("ERM", "PACS"), **dann}
        small = default_hparams(name, "ColoredMNIST")
        assert (small["lr_g"], small["lr_d"], small["weight_decay_g"]) == (1e-3, 1e-3, 0.0)
    assert default_hparams("SagNet", "PACS") == {**default_hparams("ERM", "PACS"), "sag_w_adv": 0.1}
    assert default_hparams("SelfReg", "DomainNet") == default_hparams("ERM", "DomainNet")
    for (name, dataset, seed), expected in DOMAINBED_DRAWS.items():
        drawn = random_hparams(name, dataset, seed)
        assert {k: drawn[k] for k in expected} == pytest.approx(expected, rel=1e-12) and set(drawn) - common <= set(
            expected
        )


def test_sagnet_trains_in_the_app_one_update_one_step_with_domainbeds_records(monkeypatch, tmp_path):
    from test_app_train import SMALL_SYNTHETIC, records, run_app

    from fishr_lightning.app.training.run import load_model

    run_dir = tmp_path / "run"
    assert run_app(monkeypatch, run_dir, "algorithm=sagnet", *SMALL_SYNTHETIC, "steps=3", "checkpoint_freq=2") == 0
    written = records(run_dir)
    assert [record["step"] for record in written] == [0, 2]  # DomainBed's labels: 3 updates, whatever optimizer steps
    assert {"loss_c", "loss_s", "loss_adv"} <= set(written[-1]) and written[-1]["args"]["algorithm"] == "SagNet"
    assert written[-1]["hparams"]["sag_w_adv"] == 0.1
    assert type(load_model(run_dir / "model.pt")).__name__ == "SagNet"  # model.pt rebuilds DomainBed's class


def test_the_app_builds_dann_cdann_and_selfreg_with_domainbeds_defaults():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from fishr_lightning.app.training.run import CONFIG_MODULE, build_module, domainbed_options, resolve_hparams

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            configs = {name: compose("train", [f"algorithm={name.lower()}"]) for name in ("DANN", "CDANN", "SelfReg")}
    finally:
        GlobalHydra.instance().clear()
    for name, cfg in configs.items():
        assert cfg.algorithm.name == name and cfg.algorithm.domainbed and dict(cfg.algorithm.callbacks) == {}
        with open_dict(cfg):
            cfg.num_train_domains = 2
        hparams = resolve_hparams(cfg)
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        module = build_module(backbone, (5,), 2, hparams, domainbed=domainbed_options(cfg))
        assert type(module).__name__ == name and module.num_domains == 2
        assert dict(module.hparams) == default_hparams(name, "Synthetic")
