"""FishrMixin: bias-free heads and the optimizer reset when global_step advances by more than one."""

import warnings

import fishr_reference as ref
import pytest
import torch
import torch.nn.functional as F
from test_callback import DomainClassifier, E, assert_same_weights, batches, domain_data, domainbed_loop, trainer
from torch import nn

from fishr_lightning import FishrInputError, FishrMixin
from fishr_lightning.schedule import PenaltyScheduleWarning


class BiasFreeMixin(FishrMixin, DomainClassifier):
    def __init__(self, pass_head=True, **options):
        super().__init__()
        self.classifier = nn.Linear(8, 3, bias=False).double()
        if pass_head:
            self.configure_fishr(self.classifier, **options)
        else:
            self.configure_fishr(head_bias=False, **options)

    def training_step(self, batch, batch_idx):
        x, y, domains = batch
        features = self.featurizer(x)
        logits = self.classifier(features)
        return F.cross_entropy(logits, y) + self.fishr_loss(features, logits, y, domains)


@pytest.mark.parametrize("pass_head", [True, False])
def test_a_bias_free_head_counts_only_its_weights(pass_head):
    options = dict(penalty_weight=50.0, warmup_steps=0, ema=0.9)
    model = BiasFreeMixin(pass_head, **options)
    expected = domainbed_loop(BiasFreeMixin(pass_head, **options), domain_data(), **options)
    trainer().fit(model, batches(domain_data()))
    assert model.fishr.ema_state_EP.shape == (E, 3 * 8)
    assert_same_weights(model, expected)
    assert not any("fishr" in name for name in model.state_dict()), "the head must not be registered twice"


def test_a_head_that_contradicts_head_bias_is_refused():
    with pytest.raises(FishrInputError, match="contradicts the head"):
        BiasFreeMixin(pass_head=True, head_bias=True)


class TwoOptimizersManual(FishrMixin, DomainClassifier):
    """Manual optimization with two optimizers: global_step advances by 2 per batch."""

    def __init__(self, **options):
        super().__init__("adam", 0.01)
        self.automatic_optimization = False
        self.configure_fishr(self.classifier, **options)

    def training_step(self, batch, batch_idx):
        x, y, domains = batch
        features = self.featurizer(x)
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, y) + self.fishr_loss(features, logits, y, domains)
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()

    def configure_optimizers(self):
        return [
            torch.optim.Adam(self.featurizer.parameters(), lr=0.01),
            torch.optim.Adam(self.classifier.parameters(), lr=0.01),
        ]


def test_the_optimizer_reset_fires_once_at_the_first_step_past_warmup():
    """warmup_steps=3 with steps 0, 2, 4, ...: the reset (and the penalty) start at step 4."""
    options = dict(penalty_weight=50.0, warmup_steps=3, ema=0.9)
    model = TwoOptimizersManual(**options)
    expected = TwoOptimizersManual(**options)
    make = lambda: [
        torch.optim.Adam(expected.featurizer.parameters(), lr=0.01),
        torch.optim.Adam(expected.classifier.parameters(), lr=0.01),
    ]  # noqa: E731
    optimizers, fishr, reset_done = make(), ref.ReferenceFishr(E, ema=0.9), False
    for batch_idx, (x, y, domains) in enumerate(batches(domain_data())):
        step = 2 * batch_idx
        if step >= 3 and not reset_done:
            optimizers, reset_done = make(), True
        features = expected.featurizer(x)
        weight = 50.0 if step >= 3 else 0.0
        loss = F.cross_entropy(expected.classifier(features), y) + weight * fishr(
            expected.classifier, features, y, domains
        )
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    trainer(max_steps=12).fit(model, batches(domain_data()))
    assert model.fishr_schedule.last_reset_step == 4
    assert_same_weights(model, expected)


MIXIN_OPTIONS = dict(penalty_weight=50.0, warmup_steps=2, ema=0.9)


def test_a_second_fit_of_the_mixin_equals_a_fresh_fit():
    """Issue 18, item 5: the EMA, the inferred num_domains and the optimizer reset do not carry over."""
    from test_callback import MixinClassifier

    model = MixinClassifier("adam", 0.01, **MIXIN_OPTIONS)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    trainer().fit(model, batches(domain_data(seed=1)))
    assert model.fishr.num_domains == 3 and model.fishr_schedule.last_reset_step == 2

    two_domains = domain_data()
    two_domains.tensors[2][:] = torch.arange(len(two_domains)) % 2  # the next trial has 2 domains
    model.load_state_dict(initial)
    trainer().fit(model, batches(two_domains))
    fresh = MixinClassifier("adam", 0.01, **MIXIN_OPTIONS)
    trainer().fit(fresh, batches(two_domains))
    assert model.fishr.num_domains == 2 and model.fishr.num_updates == fresh.fishr.num_updates
    assert_same_weights(model, fresh)


def test_the_mixin_resumed_from_a_checkpoint_ends_on_the_uninterrupted_weights(tmp_path):
    """Warm-up 3 with epochs of three steps: the checkpoint sits where the optimizer reset is due."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_callback import MixinClassifier

    options, three_steps = dict(MIXIN_OPTIONS, warmup_steps=3), domain_data(n_batches=3)
    uninterrupted = MixinClassifier("adam", 0.01, **options)
    trainer(max_steps=-1, max_epochs=2).fit(uninterrupted, batches(three_steps))

    first_epoch = MixinClassifier("adam", 0.01, **options)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(callbacks=[checkpoints], max_steps=-1, max_epochs=1, enable_checkpointing=True).fit(
        first_epoch, batches(three_steps)
    )
    (checkpoint,) = tmp_path.glob("*.ckpt")
    resumed = MixinClassifier("adam", 0.01, **options)
    trainer(max_steps=-1, max_epochs=2).fit(resumed, batches(three_steps), ckpt_path=checkpoint)
    assert resumed.fishr.num_updates == 6 and resumed.fishr_schedule.last_reset_step == 3
    assert_same_weights(resumed, uninterrupted)


def test_a_setup_that_does_not_call_super_is_refused():
    from test_callback import MixinClassifier

    class OwnSetup(MixinClassifier):
        def setup(self, stage):
            self.prepared = True

    with pytest.raises(FishrInputError, match=r"overrides setup\(\) without calling super\(\).setup\(stage\)"):
        trainer(max_steps=1).fit(OwnSetup(**MIXIN_OPTIONS), batches(domain_data()))


def test_a_warmup_past_the_fit_warns_once_per_fit():
    """Issue 30, as FishrCallback: warmup_steps=2 in a 2-step fit never switches the penalty on."""
    from test_callback import MixinClassifier

    model = MixinClassifier("adam", 0.01, **MIXIN_OPTIONS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_steps=2).fit(model, batches(domain_data()))
    messages = [str(w.message) for w in record if issubclass(w.category, PenaltyScheduleWarning)]
    assert len(messages) == 1 and messages[0].startswith(
        "configure_fishr's warmup_steps=2 is at or past the last optimizer step of this run (2 steps: 0 to 1)"
    )
