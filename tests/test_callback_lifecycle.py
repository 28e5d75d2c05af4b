"""FishrCallback as users drive it: fits that fail, callbacks reused across fits, validation steps
that call training_step, heads called oddly. Each case ends on the weights of a clean fit."""

import copy
import signal
import types

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from test_callback import STEPS, DomainClassifier, assert_same_weights, batches, domain_data, domainbed_loop, trainer
from torch.utils.data import TensorDataset

from fishr_lightning import FishrCallback, FishrInputError

OPTIONS = dict(penalty_weight=50.0, warmup_steps=2, ema=0.9)


def clean_fit(dataset=None, **options):
    model = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**{**OPTIONS, **options})]).fit(model, batches(dataset or domain_data()))
    return model


def assert_left_as_found(model):
    assert "training_step" not in vars(model), "the wrapper of training_step is still on the module"
    assert not model.classifier._forward_hooks and not model.classifier._forward_hooks_with_kwargs


class RaiseAtBatch(Callback):
    def __init__(self, batch_idx, exception):
        self.batch_idx, self.exception = batch_idx, exception

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            raise self.exception


@pytest.mark.parametrize("exception", [RuntimeError("CUDA out of memory"), FishrInputError("bad batch")])
def test_a_fit_that_raised_then_a_new_fit_gives_the_clean_weights(exception):
    model = DomainClassifier("adam", 0.01)
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(type(exception)):
        trainer(callbacks=[FishrCallback(**OPTIONS), RaiseAtBatch(3, exception)]).fit(model, batches(domain_data()))
    assert_left_as_found(model)

    model.load_state_dict(initial)
    trainer(callbacks=[FishrCallback(**OPTIONS)]).fit(model, batches(domain_data()))
    assert_same_weights(model, clean_fit())


def test_a_fishr_input_error_inside_the_step_leaves_the_module_as_found():
    dataset = domain_data()
    dataset.tensors[2][3 * 24 : 4 * 24] = 0  # batch 3 has one domain only
    model = DomainClassifier("adam", 0.01)
    with pytest.raises(FishrInputError, match="at least 2 samples"):
        trainer(callbacks=[FishrCallback(**OPTIONS)]).fit(model, batches(dataset))
    assert_left_as_found(model)


def test_keyboard_interrupt_leaves_the_module_as_found():
    model = DomainClassifier("adam", 0.01)
    sigint = signal.getsignal(signal.SIGINT)
    try:  # Lightning answers Ctrl+C with a graceful shutdown and sys.exit(1)
        with pytest.raises(SystemExit):
            trainer(callbacks=[FishrCallback(**OPTIONS), RaiseAtBatch(2, KeyboardInterrupt())]).fit(
                model, batches(domain_data())
            )
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert_left_as_found(model)


def test_one_callback_reused_for_several_fits_starts_each_afresh():
    """A loop over trials: the EMA, the inferred num_domains and the optimizer reset do not carry over."""
    callback = FishrCallback(**OPTIONS)
    trainer(callbacks=[callback]).fit(DomainClassifier("adam", 0.01), batches(domain_data(seed=1)))
    assert callback.penalty.num_domains == 3 and callback.schedule.last_reset_step == 2

    two_domains = domain_data()
    two_domains.tensors[2][:] = torch.arange(len(two_domains)) % 2  # the next trial has 2 domains
    model = DomainClassifier("adam", 0.01)
    trainer(callbacks=[callback]).fit(model, batches(two_domains))
    assert callback.penalty.num_domains == 2
    assert_same_weights(model, clean_fit(two_domains))

    model = DomainClassifier("adam", 0.01)
    trainer(callbacks=[callback]).fit(model, batches(domain_data()))
    assert_same_weights(model, clean_fit())


def test_setup_refuses_a_training_step_wrapped_by_another_fishr_callback():
    model = DomainClassifier("adam", 0.01)
    stale = FishrCallback(**OPTIONS)
    stale_trainer = trainer(callbacks=[stale])
    stale.setup(stale_trainer, model, "fit")  # e.g. a fit killed before Lightning's handlers ran
    stale.on_fit_start(stale_trainer, model)
    with pytest.raises(FishrInputError, match="already wrapped by another FishrCallback"):
        trainer(callbacks=[FishrCallback(**OPTIONS)]).fit(model, batches(domain_data()))
    stale.teardown(None, model, "fit")
    assert_left_as_found(model)


def test_a_training_step_instance_attribute_is_wrapped_and_put_back():
    """Lightning's ``from_compiled`` (and users) set ``training_step`` on the instance."""
    model = DomainClassifier("adam", 0.01)
    own_step = types.MethodType(DomainClassifier.training_step, model)
    model.training_step = own_step
    trainer(callbacks=[FishrCallback(**OPTIONS)]).fit(model, batches(domain_data()))
    assert vars(model)["training_step"] is own_step
    assert_same_weights(model, clean_fit())


class ValidatesWithTrainingStep(DomainClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


def test_validation_calling_training_step_gets_no_penalty_and_moves_no_ema():
    dataset = domain_data()
    model = ValidatesWithTrainingStep("adam", 0.01)
    callback = FishrCallback(**OPTIONS)
    fit = trainer(callbacks=[callback], val_check_interval=2, num_sanity_val_steps=2)
    fit.fit(model, batches(dataset), val_dataloaders=batches(dataset))
    assert callback.penalty.num_updates == STEPS
    assert_same_weights(model, clean_fit())
    unpenalised = F.cross_entropy(model.classifier(model.featurizer(dataset.tensors[0][:24])), dataset.tensors[1][:24])
    assert fit.validate(model, batches(TensorDataset(*(t[:24] for t in dataset.tensors))), verbose=False)[0][
        "val_loss"
    ] == pytest.approx(unpenalised.item(), rel=1e-12)


def test_a_head_called_with_keyword_arguments():
    class KeywordHead(DomainClassifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self.classifier(input=self.featurizer(x)), y)

    model = KeywordHead()
    trainer(callbacks=[FishrCallback(penalty_weight=50.0, warmup_steps=0, ema=0.9)]).fit(model, batches(domain_data()))
    assert_same_weights(model, domainbed_loop(DomainClassifier(), domain_data(), 50.0, warmup_steps=0, ema=0.9))


def test_a_head_run_without_autograd_is_an_error_while_the_penalty_is_on():
    class NoGradHead(DomainClassifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            with torch.no_grad():
                logits = self.classifier(self.featurizer(x))
            return F.cross_entropy(self.featurizer(x).sum() * 0 + logits, y)

    class DetachedFeatures(DomainClassifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self.classifier(self.featurizer(x).detach()), y) + self.featurizer(x).sum() * 0

    with pytest.raises(FishrInputError, match="logits carry no autograd graph"):
        trainer(callbacks=[FishrCallback(penalty_weight=1.0, warmup_steps=0)], max_steps=1).fit(
            NoGradHead(), batches(domain_data())
        )
    with pytest.raises(FishrInputError, match="carries no autograd graph .* trainable parameters before the head"):
        trainer(callbacks=[FishrCallback(penalty_weight=1.0, warmup_steps=0)], max_steps=1).fit(
            DetachedFeatures(), batches(domain_data())
        )


def test_a_linear_probe_on_frozen_features_is_fine():
    model = DomainClassifier()
    model.featurizer.requires_grad_(False)
    trainer(callbacks=[FishrCallback(penalty_weight=50.0, warmup_steps=0, ema=0.9)]).fit(model, batches(domain_data()))
    expected = DomainClassifier()
    expected.featurizer.requires_grad_(False)
    assert_same_weights(model, domainbed_loop(expected, domain_data(), 50.0, warmup_steps=0, ema=0.9))


def test_a_step_that_returns_none_keeps_nothing_captured():
    class SkipsOddBatches(DomainClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx % 2 else loss

    class CountCaptured(Callback):
        seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(len(fishr._captured))

    fishr, counter = FishrCallback(penalty_weight=50.0, warmup_steps=0, ema=0.9), CountCaptured()
    trainer(callbacks=[fishr, counter], max_steps=3).fit(SkipsOddBatches(), batches(domain_data()))
    assert counter.seen and set(counter.seen) == {0}


def test_gradient_accumulation_warns_once_at_fit_start():
    with pytest.warns(
        UserWarning, match=r"accumulate_grad_batches=2.*DomainBed computes one penalty per step"
    ) as record:
        trainer(callbacks=[FishrCallback(**OPTIONS)], accumulate_grad_batches=2, max_steps=2).fit(
            DomainClassifier(), batches(domain_data())
        )
    assert sum("accumulate_grad_batches=2" in str(w.message) for w in record) == 1
