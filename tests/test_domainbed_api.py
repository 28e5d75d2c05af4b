"""``fishr_lightning.domainbed``: DomainBed's algorithms by name as LightningModules, their state dicts
DomainBed's (issue 26). ERM is the example every algorithm's test follows: K updates of ``trainer.fit``
end on the weights of DomainBed's update written here from its formulas."""

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

from fishr_lightning.domainbed import (
    DomainBedError,
    build_algorithm,
    default_hparams,
    domainbed_state_dict,
    load_domainbed_model,
    load_domainbed_state_dict,
)

HPARAMS = {**default_hparams("ERM", "PACS"), "lr": 1e-2}


def erm(seed: int = 0):
    torch.manual_seed(seed)
    return build_algorithm("ERM", (6,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=TinyFeaturizer, seed=seed)


def test_erm_k_updates_of_trainer_fit_end_on_domainbeds_weights():
    module, batches = erm(), domain_batches(steps=4)
    initial = float64_state(module)
    # DomainBed's ERM.update, by hand: Adam on the network's parameters, the mean cross-entropy of all domains.
    reference = erm(seed=1).double()
    reference.load_state_dict(initial)
    optimizer = torch.optim.Adam(reference.network.parameters(), lr=HPARAMS["lr"], weight_decay=HPARAMS["weight_decay"])
    for batch in batches:
        x = torch.cat([x for x, _ in minibatches_of(batch)])
        y = torch.cat([y for _, y in minibatches_of(batch)])
        loss = F.cross_entropy(reference.classifier(reference.featurizer(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer = fit(module, batches)
    assert trainer.global_step == len(batches)  # one DomainBed update, one step of the run
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-10, atol=1e-12)


def test_domainbeds_state_dict_keys_load_and_round_trip():
    module = erm()
    state = domainbed_state_dict(module)
    # DomainBed's ERM: featurizer, classifier and network = Sequential(featurizer, classifier), aliases both.
    assert {key.split(".")[0] for key in state} == {"featurizer", "classifier", "network"}
    assert torch.equal(state["network.1.weight"], state["classifier.weight"])
    other = erm(seed=5)
    load_domainbed_state_dict(other, state)
    assert all(torch.equal(other.state_dict()[key], value) for key, value in state.items())


def test_a_state_dict_that_does_not_fit_is_an_error_naming_the_keys():
    module = erm()
    state = domainbed_state_dict(module)
    wrong = {key: value for key, value in state.items() if key != "classifier.bias"}
    wrong["discriminator.weight"] = torch.zeros(1)
    with pytest.raises(DomainBedError, match=r"missing keys: classifier\.bias.*unknown keys: discriminator\.weight"):
        load_domainbed_state_dict(module, wrong)


def test_domainbeds_model_pkl_rebuilds_the_module(tmp_path):
    module = erm()
    path = tmp_path / "model.pkl"
    torch.save(
        {
            "args": {"algorithm": "ERM", "dataset": "PACS", "test_envs": [0]},
            "model_input_shape": (6,),
            "model_num_classes": NUM_CLASSES,
            "model_num_domains": NUM_DOMAINS,
            "model_hparams": HPARAMS,
            "model_dict": domainbed_state_dict(module),
        },
        path,
    )
    loaded = load_domainbed_model(path, featurizer=TinyFeaturizer)
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded.predict(x), module.predict(x))


def test_unknown_names_and_missing_hyperparameters_are_errors_that_say_what_to_do():
    with pytest.raises(DomainBedError, match="Did you mean 'ERM'"):
        build_algorithm("erm", (6,), 3, 3, HPARAMS, featurizer=TinyFeaturizer)
    with pytest.raises(DomainBedError, match=r"'nonlinear_classifier'.*default_hparams\('ERM', dataset\)"):
        build_algorithm("ERM", (6,), 3, 3, {"lr": 1e-3}, featurizer=TinyFeaturizer)


def test_the_default_featurizer_is_domainbeds_networks_featurizer():
    hparams = {**HPARAMS, "mlp_width": 16, "mlp_depth": 3, "mlp_dropout": 0.0}
    module = build_algorithm("ERM", (6,), 3, 3, hparams)
    # DomainBed's MLP: input, hiddens.0 (mlp_depth − 2 of them), output; MNIST_CNN's GroupNorms bn0..bn3.
    assert [k for k in domainbed_state_dict(module) if k.startswith("featurizer.")] == [
        f"featurizer.{layer}.{p}" for layer in ("input", "hiddens.0", "output") for p in ("weight", "bias")
    ]
    cnn = build_algorithm("ERM", (2, 28, 28), 3, 3, hparams)
    assert "featurizer.bn3.weight" in domainbed_state_dict(cnn)


def test_update_called_by_hand_is_domainbeds_update_outside_a_trainer():
    # The distribution tests of the random algorithms call update() by hand for many seeds: no Trainer needed.
    module, fitted = erm(), erm()
    batch = domain_batches(steps=1)[0]
    module.double().update(minibatches_of(batch))
    fit(fitted, [batch])
    for key, value in fitted.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-12, atol=1e-14)


class DropoutFeaturizer(TinyFeaturizer):
    def forward(self, x):
        return torch.nn.functional.dropout(super().forward(x), p=0.5, training=self.training)


def test_a_resumed_fit_draws_dropout_as_the_uninterrupted_one(tmp_path):
    # Dropout draws from torch's global generator, which no checkpoint holds: each update seeds it from
    # (seed, update), so 2 updates + a checkpoint + 2 resumed updates equal 4 uninterrupted ones.
    batches = domain_batches(steps=4)

    def dropout_erm():
        torch.manual_seed(0)
        return build_algorithm("ERM", (6,), NUM_CLASSES, NUM_DOMAINS, HPARAMS, featurizer=DropoutFeaturizer).double()

    whole, first, resumed = dropout_erm(), dropout_erm(), dropout_erm()
    fit(whole, batches)
    trainer = fit(first, batches, max_steps=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    # Lightning resumes at batch 2 of a fresh iterator: the remaining batches first, the same length.
    fit(resumed, batches[2:] + batches[:2], ckpt_path=str(tmp_path / "two.ckpt"), max_steps=4)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["URM", "EQRM"])
def test_bf16_true_trains_through_lightnings_precision_plugin_one_update_one_step(name):
    # The GPU's half-precision path on the CPU: Lightning's bf16-true plugin converts the module; URM steps two
    # optimizers per update (the second straight to its optimizer), EQRM keeps DomainBed's float64 quantile.
    hparams = {**default_hparams(name, "PACS"), "lr": 1e-2, "eqrm_burnin_iters": 1}
    torch.manual_seed(0)
    module = build_algorithm(name, (6,), NUM_CLASSES, NUM_DOMAINS, hparams, featurizer=TinyFeaturizer)
    before = {key: value.clone() for key, value in module.state_dict().items()}
    batches = [tuple(t.float() if t.is_floating_point() else t for t in batch) for batch in domain_batches(steps=3)]
    trainer = fit(module, batches, precision="bf16-true")
    assert trainer.global_step == 3
    assert module.classifier.weight.dtype == torch.bfloat16 and torch.isfinite(module.classifier.weight).all()
    assert not torch.equal(module.classifier.weight.float(), before["classifier.weight"].float())
    if name == "EQRM":
        assert module.alpha.dtype == torch.float64 and module.update_count.item() == 3
