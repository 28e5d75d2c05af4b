"""``last_penalty``, the public contract through which the app records DomainBed's ``penalty``
(issue 18: instead of Lightning's private ``trainer._results``): the raw penalty of each step,
equal to DomainBed's, ``None`` before the first step of every fit."""

import fishr_reference as ref
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from test_callback import DomainClassifier, E, batches, domain_data, trainer

from fishr_lightning import FishrCallback


class PenaltyAtEachStep(Callback):
    def __init__(self, fishr):
        self.fishr, self.seen, self.at_fit_start = fishr, [], []

    def on_train_start(self, trainer, pl_module):
        self.at_fit_start.append(self.fishr.last_penalty)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(self.fishr.last_penalty)


def domainbed_penalties(model, dataset, penalty_weight, warmup_steps, ema):
    """DomainBed's Fishr.update by hand (SGD, lr 0.1): the penalty of each step."""
    opt, fishr, penalties = torch.optim.SGD(model.parameters(), lr=0.1), ref.ReferenceFishr(E, ema=ema), []
    for step, (x, y, domains) in enumerate(batches(dataset)):
        opt.zero_grad()
        features = model.featurizer(x)
        penalty = fishr(model.classifier, features, y, domains)
        weight = penalty_weight if step >= warmup_steps else 0.0
        (F.cross_entropy(model.classifier(features), y) + weight * penalty).backward()
        opt.step()
        penalties.append(float(penalty))
    return penalties


def test_last_penalty_is_each_steps_domainbed_penalty_and_none_before_every_fit():
    fishr = FishrCallback(penalty_weight=50.0, warmup_steps=2, ema=0.9)
    spy = PenaltyAtEachStep(fishr)
    assert fishr.last_penalty is None
    for _ in range(2):  # a second fit starts afresh
        spy.seen.clear()
        trainer(callbacks=[fishr, spy]).fit(DomainClassifier(), batches(domain_data()))
        expected = domainbed_penalties(DomainClassifier(), domain_data(), 50.0, 2, 0.9)
        torch.testing.assert_close(torch.tensor(spy.seen), torch.tensor(expected), rtol=1e-9, atol=1e-15)
    assert spy.at_fit_start == [None, None]
