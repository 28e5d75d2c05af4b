"""HeadPenaltyCallback, the base of every head penalty: penalties compose on one Trainer, heads made in
configure_model are found, and copies of the module taken mid-fit (deepcopy, pickle, Lightning's
EMAWeightAveraging) carry neither the wrapper nor the hook (issue 18, item 8; issue 21, item 1)."""

import copy
import pickle

import fishr_reference as ref
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from test_callback import (
    STEPS,
    DomainClassifier,
    E,
    MixinClassifier,
    assert_same_weights,
    batches,
    domain_data,
    trainer,
)
from torch import nn

from fishr_lightning import FishrCallback, FishrInputError, FishrSchedule, HeadPenaltyCallback


class LogitSquares(HeadPenaltyCallback):
    """A penalty with DomainBed's IRM-style quirks: weight 1.0 before annealing, and the loss divided
    by the weight once it exceeds 1 (the penalty itself is SD's mean squared logit)."""

    name = "logit_squares"

    def __init__(self, weight=4.0, anneal_steps=3, **kwargs):
        super().__init__(
            schedule=FishrSchedule(weight, anneal_steps, reset_optimizer=False, weight_before=1.0), **kwargs
        )

    def compute_penalty(self, features_ND, logits_NC, targets_N, domains_N, weight, trainer):
        return (logits_NC**2).mean()

    def combine(self, loss, penalty, weight):
        total = loss + weight * penalty
        return total / weight if weight > 1.0 else total


class RecordLogs(Callback):
    def __init__(self, *keys):
        self.keys, self.rows = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append([trainer.callback_metrics[key].item() for key in self.keys])


def assert_left_as_found(model, head="classifier"):
    assert "training_step" not in vars(model), "the wrapper of training_step is still on the module"
    assert not model.get_submodule(head)._forward_hooks


def two_penalties_loop(dataset):
    """Fishr (λ=50 from step 2) then LogitSquares (1.0, then 4.0 from step 3, the sum divided by 4), by hand."""
    model = DomainClassifier()
    optimizer, fishr = torch.optim.SGD(model.parameters(), lr=0.1), ref.ReferenceFishr(E, ema=0.9)
    for step, (x, y, domains) in enumerate(batches(dataset)):
        features = model.featurizer(x)
        logits = model.classifier(features)
        loss = F.cross_entropy(logits, y) + (50.0 if step >= 2 else 0.0) * fishr(model.classifier, features, y, domains)
        weight = 4.0 if step >= 3 else 1.0
        loss = loss + weight * (logits**2).mean()
        loss = loss / weight if weight > 1.0 else loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_two_penalties_on_one_trainer_compose_in_order_with_their_own_schedules_and_logs():
    dataset = domain_data()
    model, fishr, squares = (
        DomainClassifier(),
        FishrCallback(penalty_weight=50.0, warmup_steps=2, ema=0.9),
        LogitSquares(),
    )
    logs = RecordLogs("fishr/weight", "logit_squares/weight", "logit_squares/penalty")
    trainer(callbacks=[fishr, squares, logs]).fit(model, batches(dataset))
    assert_same_weights(model, two_penalties_loop(dataset))
    assert [row[:2] for row in logs.rows] == [
        [0.0, 1.0],
        [0.0, 1.0],
        [50.0, 1.0],
        [50.0, 4.0],
        [50.0, 4.0],
        [50.0, 4.0],
    ]
    assert squares.last_penalty == logs.rows[-1][2] > 0 and fishr.last_penalty > 0
    assert_left_as_found(model)


def test_teardown_in_either_order_leaves_the_module_as_found():
    model, fishr, squares = DomainClassifier(), FishrCallback(penalty_weight=1.0, warmup_steps=0), LogitSquares()
    trainer(callbacks=[fishr, squares], max_steps=2).fit(model, batches(domain_data()))
    assert_left_as_found(model)  # Lightning tears down the inner one (the first listed) first
    for callback in (fishr, squares):
        callback._install(model)
    outer, inner = squares._wrapper, fishr._wrapper
    assert vars(model)["training_step"] is outer and outer.inner is inner
    fishr._restore()  # the inner one first: it is taken out of the chain
    assert vars(model)["training_step"] is outer and outer.__wrapped__ is DomainClassifier.training_step
    squares._restore()
    assert_left_as_found(model)


def test_two_callbacks_with_one_name_are_refused_and_names_key_the_checkpoint_state():
    with pytest.raises(FishrInputError, match=r"2 penalty callbacks .* named 'fishr' \(FishrCallback, LogitSq.*name="):
        trainer(callbacks=[FishrCallback(), LogitSquares(name="fishr")]).fit(DomainClassifier(), batches(domain_data()))
    with pytest.raises(RuntimeError, match="state_key"):  # Lightning's own check, for one class
        trainer(callbacks=[FishrCallback(), FishrCallback(head="classifier")])
    # The default name keeps the key that checkpoints always had; another name gets its own key.
    assert FishrCallback().state_key == "FishrCallback"
    assert FishrCallback(name="fishr_b").state_key != "FishrCallback"


def test_last_penalty_is_reset_at_each_fit_and_equals_the_logged_penalty():
    fishr, logs = FishrCallback(penalty_weight=50.0, warmup_steps=0, ema=0.9), RecordLogs("fishr/penalty")
    assert fishr.last_penalty is None
    fit = trainer(callbacks=[fishr, logs], max_steps=2)
    fit.fit(DomainClassifier(), batches(domain_data()))
    assert fishr.last_penalty == logs.rows[-1][0] > 0
    fishr.setup(fit, DomainClassifier(), "fit")
    assert fishr.last_penalty is None


class LateHead(DomainClassifier):
    """The head is created in configure_model, Lightning's place for late layers, with the weights
    DomainClassifier gives it in __init__."""

    def __init__(self, *args):
        super().__init__(*args)
        self.initial_head = copy.deepcopy(self.classifier.state_dict())
        del self.classifier
        self.classifier = None

    def configure_model(self):
        if self.classifier is None:
            self.classifier = nn.Linear(8, 3).double()
            self.classifier.load_state_dict(self.initial_head)


def test_a_head_created_in_configure_model_trains_with_the_penalty_as_one_made_in_init():
    options = dict(penalty_weight=50.0, warmup_steps=2, ema=0.9)
    late, fishr = LateHead("adam", 0.01), FishrCallback(**options)
    trainer(callbacks=[fishr]).fit(late, batches(domain_data()))
    early = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)]).fit(early, batches(domain_data()))
    assert fishr.head_module is late.classifier and fishr.last_penalty > 0
    assert_same_weights(late, early)
    assert_left_as_found(late)


class CopyMidFit(Callback):
    """Copies the module between two training steps, while the callback's wrapper is on it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2:
            assert "training_step" in vars(pl_module), "the wrapper is installed during the fit"
            self.copies = {"deepcopy": copy.deepcopy(pl_module), "pickle": pickle.loads(pickle.dumps(pl_module))}
            self.batch = batch


def test_copies_taken_mid_fit_have_the_class_training_step_and_no_hook():
    model, copier = DomainClassifier("adam", 0.01), CopyMidFit()
    fishr = FishrCallback(penalty_weight=50.0, warmup_steps=2, ema=0.9)
    trainer(callbacks=[fishr, LogitSquares(), copier]).fit(model, batches(domain_data()))
    x, y, _ = copier.batch
    for how, duplicate in copier.copies.items():
        step = duplicate.training_step
        assert step.__func__ is DomainClassifier.training_step and step.__self__ is duplicate, how
        assert not duplicate.classifier._forward_hooks and not duplicate.classifier._forward_hooks_with_kwargs, how
        plain = F.cross_entropy(duplicate.classifier(duplicate.featurizer(x)), y)
        assert torch.equal(duplicate.training_step(copier.batch, 0), plain), how
    assert fishr.penalty.num_updates == STEPS  # the copies' steps above went through no callback
    assert_left_as_found(model)


def test_ema_weight_averaging_with_the_callback_equals_it_with_the_mixin():
    """Lightning's EMAWeightAveraging deep-copies the module at setup and swaps the average in at the end."""
    options = dict(penalty_weight=50.0, warmup_steps=2, ema=0.9)
    with_callback = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options), EMAWeightAveraging(decay=0.5)]).fit(
        with_callback, batches(domain_data())
    )
    with_mixin = MixinClassifier("adam", 0.01, **options)
    trainer(callbacks=[EMAWeightAveraging(decay=0.5)]).fit(with_mixin, batches(domain_data()))
    assert_same_weights(with_callback, with_mixin)
    assert_left_as_found(with_callback)
    plain = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)]).fit(plain, batches(domain_data()))
    assert not torch.equal(plain.classifier.weight, with_callback.classifier.weight)  # the average was swapped in


def test_a_penalty_without_a_graph_while_its_weight_is_positive_is_refused():
    class Detached(LogitSquares):
        def compute_penalty(self, features_ND, logits_NC, targets_N, domains_N, weight, trainer):
            return (logits_NC.detach() ** 2).mean()

    model = DomainClassifier()
    with pytest.raises(FishrInputError, match="Detached's penalty weight is 1.0 but its penalty carries no autograd"):
        trainer(callbacks=[Detached()], max_steps=1).fit(model, batches(domain_data()))
    assert_left_as_found(model)


def test_the_schedule_ramps_from_the_weight_before_annealing():
    schedule = FishrSchedule(10.0, warmup_steps=2, ramp_steps=2, weight_before=1.0)
    assert [schedule.weight(step) for step in range(5)] == [1.0, 1.0, 5.5, 10.0, 10.0]
    assert [FishrSchedule(10.0, warmup_steps=1).weight(step) for step in range(3)] == [0.0, 10.0, 10.0]
