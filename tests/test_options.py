"""FishrOptions: one definition of Fishr's options, taken by the callback, the mixin and the CLI (issue 18, item 10)."""

import dataclasses
import inspect

import pytest
from test_callback import DomainClassifier

from fishr_lightning import FishrCallback, FishrInputError, FishrMixin, FishrOptions


def test_the_callback_and_the_mixin_hold_equal_options_from_the_same_keywords():
    keywords = dict(penalty_weight=10.0, warmup_steps=3, ema=0.5, param_reduction="sum", penalty_ramp_steps=2)

    class Mixin(FishrMixin, DomainClassifier):
        def __init__(self):
            super().__init__()
            self.configure_fishr(self.classifier, **keywords)

    callback, module = FishrCallback(**keywords), Mixin()
    assert callback.options == module.fishr_options == FishrOptions(**keywords)
    assert (callback.schedule.penalty_weight, callback.schedule.ramp_steps, callback.penalty.ema) == (10.0, 2, 0.5)
    assert (module.fishr_schedule.warmup_steps, module.fishr.param_reduction) == (3, "sum")


def test_the_defaults_are_domainbeds_and_written_once():
    defaults = FishrOptions()
    assert (defaults.penalty_weight, defaults.warmup_steps, defaults.ema) == (1000.0, 1500, 0.95)
    # Neither the callback's nor the mixin's signature repeats an option: they take **options.
    names = {field.name for field in dataclasses.fields(FishrOptions)}
    for function in (FishrCallback.__init__, FishrMixin.configure_fishr):
        assert not names & set(inspect.signature(function).parameters), function.__qualname__


@pytest.mark.parametrize("make", [lambda: FishrCallback(penalty_wieght=1.0), lambda: FishrOptions.check_names(
    "configure_fishr", {"penalty_wieght": 1.0})])  # fmt: skip
def test_a_misspelt_option_names_the_known_ones(make):
    with pytest.raises(FishrInputError, match=r"unknown Fishr option\(s\) \['penalty_wieght'\].*'penalty_weight'"):
        make()


@pytest.mark.parametrize(
    "bad, message",
    [(dict(ema=1.0), "ema must be in"), (dict(backend="jax"), "Unknown backend"), (dict(warmup_steps=-1), ">= 0")],
)
def test_a_wrong_value_fails_at_construction(bad, message):
    with pytest.raises(FishrInputError, match=message):
        FishrOptions(**bad)
    with pytest.raises(FishrInputError, match=message):
        FishrCallback(**bad)


def test_the_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FishrOptions().ema = 0.5
