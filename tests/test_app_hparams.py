"""DomainBed's hyperparameter registry: defaults, random-search draws pinned to exact values, and
draws seeded per hyperparameter name (DomainBed issue #169)."""

from __future__ import annotations

import numpy as np
import pytest

from fishr_lightning.app.training import hparams as registry_module
from fishr_lightning.app.training.hparams import default_hparams, hparams_for, random_hparams, seed_hash


def test_seed_hash_is_domainbeds_md5_of_the_arguments():
    assert seed_hash(0, 0) == 894182419  # int(md5(b"(0, 0)").hexdigest(), 16) % 2**31
    assert seed_hash(1, 2) == seed_hash(1, 2) != seed_hash(2, 1)


def test_hparams_seed_zero_gives_domainbeds_defaults():
    assert hparams_for("Fishr", "PACS", hparams_seed=0, trial_seed=3) == default_hparams("Fishr", "PACS")
    pacs = default_hparams("Fishr", "PACS")
    assert (pacs["lr"], pacs["batch_size"], pacs["weight_decay"], pacs["resnet_dropout"]) == (5e-5, 32, 0.0, 0.0)
    assert (pacs["lambda"], pacs["penalty_anneal_iters"], pacs["ema"]) == (1000.0, 1500, 0.95)
    mnist = default_hparams("ERM", "ColoredMNIST")
    assert (mnist["lr"], mnist["batch_size"]) == (1e-3, 64)
    assert "lambda" not in mnist


def test_random_draws_are_pinned():
    draw = hparams_for("Fishr", "PACS", hparams_seed=1, trial_seed=0)
    assert draw["lr"] == pytest.approx(2.7028930742148706e-05, rel=1e-12)
    assert draw["batch_size"] == 39
    assert draw["weight_decay"] == pytest.approx(0.00044832883881609976, rel=1e-12)
    assert draw["resnet_dropout"] == 0.5
    assert draw["lambda"] == pytest.approx(809.251247284292, rel=1e-12)
    assert draw["penalty_anneal_iters"] == 4072
    assert draw["ema"] == pytest.approx(0.9129082782560279, rel=1e-12)
    # DomainBed's scheme, spelled out: one RandomState per name, seeded by (seed_hash(1, 0), name).
    lr_state = np.random.RandomState(seed_hash(seed_hash(1, 0), "lr"))
    assert draw["lr"] == 10 ** lr_state.uniform(-5, -3.5)


def test_draws_lie_in_domainbeds_search_distributions():
    for seed in range(1, 30):
        draw = random_hparams("Fishr", "OfficeHome", seed)
        assert 10**-5 <= draw["lr"] <= 10**-3.5
        assert 8 <= draw["batch_size"] <= 2**5.5
        assert 10**-6 <= draw["weight_decay"] <= 10**-2
        assert draw["resnet_dropout"] in (0.0, 0.1, 0.5)
        assert 10 <= draw["lambda"] <= 10**4
        assert 0 <= draw["penalty_anneal_iters"] < 5000
        assert 0.90 <= draw["ema"] <= 0.99
    assert all(8 <= random_hparams("ERM", "DomainNet", s)["batch_size"] <= 32 for s in range(1, 30))


def test_draws_are_deterministic_and_depend_on_both_seeds():
    assert hparams_for("ERM", "VLCS", 3, 1) == hparams_for("ERM", "VLCS", 3, 1)
    assert hparams_for("ERM", "VLCS", 3, 1)["lr"] != hparams_for("ERM", "VLCS", 3, 2)["lr"]
    assert hparams_for("ERM", "VLCS", 3, 1)["lr"] != hparams_for("ERM", "VLCS", 4, 1)["lr"]


def test_algorithms_share_the_draws_of_shared_hyperparameters():
    erm, fishr = hparams_for("ERM", "PACS", 5, 0), hparams_for("Fishr", "PACS", 5, 0)
    for name in ("lr", "batch_size", "weight_decay", "resnet_dropout"):
        assert erm[name] == fishr[name]


def test_adding_a_hyperparameter_changes_no_other_draw(monkeypatch):
    before = hparams_for("Fishr", "PACS", 7, 0)
    original = registry_module.registry

    def registry_with_one_more(algorithm, dataset):
        return {"a_new_hparam": (1.0, lambda r: r.uniform()), **original(algorithm, dataset)}

    monkeypatch.setattr(registry_module, "registry", registry_with_one_more)
    after = hparams_for("Fishr", "PACS", 7, 0)
    assert {k: v for k, v in after.items() if k != "a_new_hparam"} == before


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(
        ValueError, match=r"No hyperparameters registered for algorithm 'NoSuchAlgorithm' \(known: ERM, "
    ):
        default_hparams("NoSuchAlgorithm", "PACS")  # DANN was the example before issue 26 registered it


# DomainBed's registry entries of the comparison set (hparams_registry.py): (default, low, high) of the
# exponent or value, and how a uniform draw u becomes the value.
COMPARISON_SET = {
    "IRM": {"irm_lambda": (1e2, -1, 5, lambda u: 10**u), "irm_penalty_anneal_iters": (500, 0, 4, lambda u: int(10**u))},
    "VREx": {
        "vrex_lambda": (1e1, -1, 5, lambda u: 10**u),
        "vrex_penalty_anneal_iters": (500, 0, 4, lambda u: int(10**u)),
    },
    "CORAL": {"mmd_gamma": (1.0, -1, 1, lambda u: 10**u)},
    "MMD": {"mmd_gamma": (1.0, -1, 1, lambda u: 10**u)},
    "GroupDRO": {"groupdro_eta": (1e-2, -3, -1, lambda u: 10**u)},
    "Mixup": {"mixup_alpha": (0.2, -1, 1, lambda u: 10**u)},
    "SD": {"sd_reg": (0.1, -5, -1, lambda u: 10**u)},
}


@pytest.mark.parametrize("algorithm", sorted(COMPARISON_SET))
@pytest.mark.parametrize("dataset", ["PACS", "ColoredMNIST"])
def test_comparison_set_defaults_and_draws_are_domainbeds(algorithm, dataset):
    defaults = default_hparams(algorithm, dataset)
    erm_defaults = default_hparams("ERM", dataset)
    assert {k: v for k, v in defaults.items() if k not in COMPARISON_SET[algorithm]} == erm_defaults
    for hparams_seed, trial_seed in ((1, 0), (7, 2)):
        draw = hparams_for(algorithm, dataset, hparams_seed, trial_seed)
        # Shared names draw as ERM's: paired comparisons.
        assert {k: v for k, v in draw.items() if k not in COMPARISON_SET[algorithm]} == hparams_for(
            "ERM", dataset, hparams_seed, trial_seed
        )
        for name, (default, low, high, to_value) in COMPARISON_SET[algorithm].items():
            assert defaults[name] == default
            # DomainBed's _hparam: RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name)).uniform(low, high)
            state = np.random.RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name))
            assert draw[name] == to_value(state.uniform(low, high))


def test_a_comparison_draw_is_pinned():
    draw = hparams_for("IRM", "PACS", hparams_seed=1, trial_seed=0)
    assert draw["irm_lambda"] == pytest.approx(
        65030.52212762795, rel=1e-12
    )  # DomainBed's random_hparams("IRM", "PACS", seed_hash(1, 0))
    assert draw["irm_penalty_anneal_iters"] == 2


# issue 26: the random-search distributions overridable per algorithm (the paper's Table 13).
def _lambda_u(hparams_seed: int, trial_seed: int) -> float:
    """The uniform number in [0, 1) that DomainBed's lambda draw maps: RandomState.uniform(a, b) is a + (b - a) u."""
    return np.random.RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), "lambda")).random_sample()


def test_a_search_distribution_replaces_one_names_draws_and_no_other():
    search = registry_module.search_space({"lambda": ["log10_uniform", 1, 5]}, "Fishr", "PACS")
    samplers = {name: sampler for name, (_, sampler) in search.items()}
    assert registry_module.recorded_search_space(search) == {"lambda": ["log10_uniform", 1.0, 5.0]}
    for hparams_seed in range(1, 21):
        registry_draw = hparams_for("Fishr", "PACS", hparams_seed, 0)
        draw = hparams_for("Fishr", "PACS", hparams_seed, 0, samplers)
        u = _lambda_u(hparams_seed, 0)
        assert registry_draw["lambda"] == pytest.approx(10 ** (1 + 3 * u), rel=1e-12)  # DomainBed's 10^U(1,4)
        assert draw["lambda"] == pytest.approx(10 ** (1 + 4 * u), rel=1e-12)  # the same u, on 10^U(1,5)
        assert 1 <= np.log10(draw["lambda"]) < 5
        assert {k: v for k, v in draw.items() if k != "lambda"} == {
            k: v for k, v in registry_draw.items() if k != "lambda"
        }
    # The default is not part of the distribution (DomainBed's registry keeps them apart): hparams_seed=0 is 1000.
    assert hparams_for("Fishr", "PACS", 0, 0, samplers) == default_hparams("Fishr", "PACS")


def test_search_distributions_of_every_kind_draw_as_domainbeds_lambdas():
    spec = {
        "resnet_dropout": ["choice", 0.0, 0.2, 0.7],
        "batch_size": ["int_log2_uniform", 3, 6],
        "penalty_anneal_iters": ["int_uniform", 0, 100],
        "ema": ["uniform", 0.5, 0.6],
        "weight_decay": ["constant", 0.125],
    }
    samplers = {name: s for name, (_, s) in registry_module.search_space(spec, "Fishr", "VLCS").items()}
    for hparams_seed in (1, 2, 3, 9):
        draw = hparams_for("Fishr", "VLCS", hparams_seed, 1, samplers)

        seed = seed_hash(hparams_seed, 1)

        def state(name, seed=seed):
            return np.random.RandomState(seed_hash(seed, name))

        assert draw["resnet_dropout"] == [0.0, 0.2, 0.7][state("resnet_dropout").choice(3)]
        assert draw["resnet_dropout"] == state("resnet_dropout").choice([0.0, 0.2, 0.7])  # r.choice's index
        assert draw["batch_size"] == int(2 ** state("batch_size").uniform(3, 6))
        assert draw["penalty_anneal_iters"] == int(state("penalty_anneal_iters").uniform(0, 100))
        assert draw["ema"] == state("ema").uniform(0.5, 0.6)
        assert draw["weight_decay"] == 0.125
        assert draw["lr"] == hparams_for("Fishr", "VLCS", hparams_seed, 1)["lr"]


def test_a_search_distribution_under_an_algorithms_name_applies_to_its_runs_only():
    search = {"Fishr": {"lambda": ["log10_uniform", 1, 5]}, "lr": ["log10_uniform", -4, -3]}
    assert set(registry_module.search_space(search, "Fishr", "PACS")) == {"lambda", "lr"}
    assert set(registry_module.search_space(search, "ERM", "PACS")) == {"lr"}  # checked, not applied


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            {"lamda": ["log10_uniform", 1, 5]},
            r"'lamda' is not a hyperparameter of Fishr on PACS; its hyperparameters "
            r"are batch_size, class_balanced, data_augmentation, ema, lambda, lr",
        ),
        (
            {"irm_lambda": ["log10_uniform", 1, 5]},
            r"It is IRM(, \w+)*'s: write \+hparams_search.IRM.irm_lambda=\[...\]",
        ),
        ({"IRM": {"lambda": ["log10_uniform", 1, 5]}}, r"'lambda' is not a hyperparameter of IRM on PACS"),
        (
            {"lambda": ["loguniform", 1, 5]},
            r"unknown distribution kind 'loguniform'\. Write \+hparams_search.lambda="
            r"\[KIND,a,b\] with KIND one of uniform, log10_uniform, log2_uniform, int_uniform, int_log10_uniform, "
            r"int_log2_uniform .*\[choice,v1,v2,...\] or \+hparams_search.lambda=\[constant,v\]",
        ),
        ({"lambda": ["log10_uniform", 5, 1]}, r"log10_uniform\(5, 1\) needs a < b"),
        ({"lambda": ["log10_uniform", 1]}, r"log10_uniform takes two numbers a < b, got \[1\]"),
        ({"lambda": ["uniform", 1, "x"]}, r"uniform takes two numbers a < b"),
        ({"lambda": ["choice"]}, r"choice takes one value or more"),
        ({"lambda": ["constant", 1, 2]}, r"constant takes one value, got \[1, 2\]"),
        ({"lambda": "log10_uniform(1,5)"}, r"hparams_search.lambda='log10_uniform\(1,5\)' is not a distribution"),
        (
            {"penalty_anneal_iters": ["uniform", 0, 10]},
            r"penalty_anneal_iters is an integer \(default 1500\); draw "
            r"it with int_uniform",
        ),
    ],
    ids=[
        "misspelt",
        "another_algorithms",
        "not_that_algorithms",
        "kind",
        "order",
        "arity",
        "not_a_number",
        "empty_choice",
        "constant_arity",
        "a_string",
        "integer",
    ],
)
def test_a_bad_search_distribution_is_one_clear_error(search, message):
    with pytest.raises(registry_module.SearchSpaceError, match=message):
        registry_module.search_space(search, "Fishr", "PACS")
