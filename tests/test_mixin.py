"""FishrMixin: bias-free heads and the optimizer reset when global_step advances by more than one."""

import fishr_reference as ref
import pytest
import torch
import torch.nn.functional as F
from test_callback import DomainClassifier, E, assert_same_weights, batches, domain_data, domainbed_loop, trainer
from torch import nn

from fishr_lightning import FishrInputError, FishrMixin


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
