"""FishrCallback and FishrMixin train exactly as DomainBed's Fishr loop, written by hand here."""

import copy

import fishr_reference as ref
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning import FishrCallback, FishrInputError, FishrMixin, FishrPenalty

E, BATCH, STEPS = 3, 24, 6


def domain_data(n_batches=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_batches * BATCH
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    domains = torch.arange(n) % E
    return TensorDataset(x, y, domains)


def batches(dataset, batch_size=BATCH):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class DomainClassifier(pl.LightningModule):
    """A user's plain module: featurizer, then the final nn.Linear `classifier`."""

    def __init__(self, optimizer="sgd", lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.featurizer = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.classifier = nn.Linear(8, 3)
        self.optimizer_name, self.lr = optimizer, lr
        self.double()

    def training_step(self, batch, batch_idx):
        x, y, _domains = batch
        return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MixinClassifier(FishrMixin, DomainClassifier):
    def __init__(self, optimizer="sgd", lr=0.1, **fishr_options):
        super().__init__(optimizer, lr)
        self.configure_fishr(**fishr_options)

    def training_step(self, batch, batch_idx):
        x, y, domains = batch
        features = self.featurizer(x)
        logits = self.classifier(features)
        return F.cross_entropy(logits, y) + self.fishr_loss(features, logits, y, domains)


def trainer(**kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=STEPS,
    )
    return pl.Trainer(**{**options, **kwargs})


def domainbed_loop(model, dataset, penalty_weight, warmup_steps, ema, optimizer="sgd", lr=0.1, accumulate=1):
    """DomainBed's Fishr.update, by hand: re-creates Adam at the warm-up step, as DomainBed does."""
    model = copy.deepcopy(model)
    make_optimizer = (
        (lambda: torch.optim.Adam(model.parameters(), lr=lr))
        if optimizer == "adam"
        else (lambda: torch.optim.SGD(model.parameters(), lr=lr))
    )
    opt = make_optimizer()
    fishr = ref.ReferenceFishr(E, ema=ema)
    for micro_step, (x, y, domains) in enumerate(batches(dataset)):
        step = micro_step // accumulate
        if micro_step % accumulate == 0:
            if step == warmup_steps != 0:
                opt = make_optimizer()
            opt.zero_grad()
        features = model.featurizer(x)
        penalty = fishr(model.classifier, features, y, domains)
        weight = penalty_weight if step >= warmup_steps else 0.0
        ((F.cross_entropy(model.classifier(features), y) + weight * penalty) / accumulate).backward()
        if micro_step % accumulate == accumulate - 1:
            opt.step()
    return model


def assert_same_weights(model_a, model_b, rtol=1e-9):
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["closed_form", "backpack"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_with_callback_equals_domainbed_loop(backend, optimizer):
    dataset = domain_data()
    lr = 0.1 if optimizer == "sgd" else 0.01
    expected = domainbed_loop(DomainClassifier(), dataset, 50.0, warmup_steps=3, ema=0.9, optimizer=optimizer, lr=lr)
    model = DomainClassifier(optimizer, lr)
    callback = FishrCallback(penalty_weight=50.0, warmup_steps=3, ema=0.9, head="classifier", backend=backend)
    trainer(callbacks=[callback]).fit(model, batches(dataset))
    assert_same_weights(model, expected)
    assert type(model).training_step is DomainClassifier.training_step and "training_step" not in vars(model)


def test_mixin_trains_to_the_same_weights_as_the_callback():
    dataset = domain_data()
    options = dict(penalty_weight=50.0, warmup_steps=2, ema=0.9)
    with_callback = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)]).fit(with_callback, batches(dataset))
    with_mixin = MixinClassifier("adam", 0.01, **options)
    trainer().fit(with_mixin, batches(dataset))
    assert_same_weights(with_mixin, with_callback)


def test_logs_penalty_and_weight():
    model = DomainClassifier()
    fit = trainer(callbacks=[FishrCallback(penalty_weight=50.0, warmup_steps=3, ema=0.9)])
    fit.fit(model, batches(domain_data()))
    assert fit.callback_metrics["fishr/weight"].item() == 50.0
    assert fit.callback_metrics["fishr/penalty"].item() > 0


def test_warmup_logs_zero_weight_and_leaves_the_loss_unchanged():
    dataset = domain_data()
    model = DomainClassifier()
    fit = trainer(callbacks=[FishrCallback(penalty_weight=1e6, warmup_steps=STEPS, ema=0.9)])
    fit.fit(model, batches(dataset))
    assert fit.callback_metrics["fishr/weight"].item() == 0.0
    assert_same_weights(model, domainbed_loop(DomainClassifier(), dataset, 0.0, warmup_steps=STEPS, ema=0.9))


def test_gradient_accumulation_penalises_each_micro_batch_and_steps_on_their_mean():
    dataset = domain_data(n_batches=8)
    expected = domainbed_loop(DomainClassifier(), dataset, 50.0, warmup_steps=2, ema=0.9, accumulate=2)
    model = DomainClassifier()
    callback = FishrCallback(penalty_weight=50.0, warmup_steps=2, ema=0.9)
    trainer(callbacks=[callback], accumulate_grad_batches=2, max_steps=4).fit(model, batches(dataset))
    assert_same_weights(model, expected)
    assert callback.penalty.num_updates == 8


def test_resume_from_a_mid_training_checkpoint_ends_on_the_uninterrupted_weights(tmp_path):
    """Epochs of three steps, warm-up 3: the checkpoint after epoch 1 sits right where the
    optimizer reset is due, so the EMA, the step count and the reset must all survive it."""
    options = dict(penalty_weight=50.0, warmup_steps=3, ema=0.9)
    three_steps = domain_data(n_batches=3)
    uninterrupted = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)], max_steps=-1, max_epochs=2).fit(uninterrupted, batches(three_steps))

    first_epoch = DomainClassifier("adam", 0.01)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(
        callbacks=[FishrCallback(**options), checkpoints], max_steps=-1, max_epochs=1, enable_checkpointing=True
    ).fit(first_epoch, batches(three_steps))
    (checkpoint,) = tmp_path.glob("*.ckpt")
    assert torch.load(checkpoint, weights_only=False)["callbacks"]["FishrCallback"]["penalty"]["num_updates"] == 3

    resumed = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(**options)], max_steps=-1, max_epochs=2).fit(
        resumed, batches(three_steps), ckpt_path=checkpoint
    )
    assert_same_weights(resumed, uninterrupted)
    assert not any(torch.equal(a, b) for a, b in zip(resumed.parameters(), first_epoch.parameters()))


def test_batches_as_mappings_or_any_layout_through_a_function():
    class DictModule(DomainClassifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.classifier(self.featurizer(batch["x"])), batch["y"])

    class Relayout(torch.utils.data.Dataset):
        def __init__(self, dataset, layout):
            self.dataset, self.layout = dataset, layout

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            return self.layout(*self.dataset[i])

    dataset = domain_data()
    as_dicts = batches(Relayout(dataset, lambda x, y, d: {"x": x, "y": y, "domain": d}))
    expected = domainbed_loop(DomainClassifier(), dataset, 50.0, warmup_steps=0, ema=0.9)
    model = DictModule()
    trainer(callbacks=[FishrCallback(penalty_weight=50.0, warmup_steps=0, ema=0.9)]).fit(model, as_dicts)
    assert_same_weights(model, expected)

    as_pairs = batches(Relayout(dataset, lambda x, y, d: ((x, d), y)))

    class PairModule(DomainClassifier):
        def training_step(self, batch, batch_idx):
            (x, _), y = batch
            return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    model = PairModule()
    callback = FishrCallback(
        penalty_weight=50.0, warmup_steps=0, ema=0.9, targets_and_domains=lambda batch: (batch[1], batch[0][1])
    )
    trainer(callbacks=[callback]).fit(model, as_pairs)
    assert_same_weights(model, expected)


def test_dict_outputs_keep_their_other_entries():
    class DictOutput(DomainClassifier):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": torch.tensor(1.0)}

    dataset = domain_data()
    model = DictOutput()
    trainer(callbacks=[FishrCallback(penalty_weight=50.0, warmup_steps=0, ema=0.9)]).fit(model, batches(dataset))
    assert_same_weights(model, domainbed_loop(DomainClassifier(), dataset, 50.0, warmup_steps=0, ema=0.9))


# On CPU Lightning runs "16-mixed" as bfloat16 autocast (with its gradient scaler); true float16
# autocast needs a GPU, where the same code path runs.
@pytest.mark.parametrize("precision, logits_dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.bfloat16)])
def test_mixed_precision_computes_the_penalty_in_float32(monkeypatch, precision, logits_dtype):
    seen_dtypes = []
    original_call = FishrPenalty.__call__

    def recording_call(self, features, logits, *args, **kwargs):
        value = original_call(self, features, logits, *args, **kwargs)
        seen_dtypes.append((logits.dtype, value.dtype))
        return value

    monkeypatch.setattr(FishrPenalty, "__call__", recording_call)
    model = DomainClassifier().float()
    before = copy.deepcopy(model.state_dict())
    fit = trainer(callbacks=[FishrCallback(penalty_weight=10.0, warmup_steps=1, ema=0.9)], precision=precision)
    fit.fit(model, batches(TensorDataset(*(t.float() if t.is_floating_point() else t for t in domain_data().tensors))))
    assert len(seen_dtypes) == STEPS
    assert all(logits == logits_dtype and value == torch.float32 for logits, value in seen_dtypes), seen_dtypes
    assert torch.isfinite(fit.callback_metrics["fishr/penalty"])
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# Under 16-true/bf16-true the head is half precision and the penalty's features come promoted to float32;
# BackPACK runs a float32 twin of the head (issue 25: it crashed, "mat1 and mat2 must have the same dtype").
# Both half types run on the CPU (torch >= 2.1 has float16 matmuls there).
@pytest.mark.parametrize("precision, unit_roundoff", [("bf16-true", 2**-8), ("16-true", 2**-11)])
def test_backpack_under_true_half_precision_gives_the_closed_forms_penalty(monkeypatch, precision, unit_roundoff):
    compared = []
    original_call = FishrPenalty.__call__

    def with_the_closed_form_beside(self, features, logits, targets, domains, head=None):
        closed_form = copy.deepcopy(self)  # the same EMA state, the same inputs
        closed_form.backend = "closed_form"
        expected = original_call(closed_form, features, logits, targets, domains, head=head)
        value = original_call(self, features, logits, targets, domains, head=head)
        gradients = [torch.autograd.grad(v, head.weight, retain_graph=True)[0] for v in (value, expected)]
        compared.append((value.dtype, value.item(), expected.item(), *gradients))
        return value

    monkeypatch.setattr(FishrPenalty, "__call__", with_the_closed_form_beside)
    model = DomainClassifier().float()
    data = TensorDataset(*(t.float() if t.is_floating_point() else t for t in domain_data().tensors))
    callback = FishrCallback(penalty_weight=10.0, warmup_steps=1, ema=0.9, backend="backpack")
    trainer(callbacks=[callback], precision=precision).fit(model, batches(data))
    assert model.classifier.weight.dtype == {"bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]
    assert len(compared) == STEPS
    for dtype, value, expected, gradient, expected_gradient in compared:
        assert dtype == torch.float32 and abs(value - expected) <= unit_roundoff * expected
        # The penalty's gradient reaches the head's own (half) weights through the twin.
        assert (gradient - expected_gradient).abs().max() <= 4 * unit_roundoff * expected_gradient.abs().max()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- refusing what cannot be right ---------------------------------------------------------------


def test_default_head_is_the_classifier_and_ambiguity_is_an_error():
    class TwoLinears(DomainClassifier):
        def __init__(self):
            super().__init__()
            self.out_a, self.out_b = self.classifier, nn.Linear(8, 3).double()
            del self.classifier

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self.out_a(self.featurizer(x)), y)

    callback = FishrCallback(penalty_weight=1.0, warmup_steps=0)
    trainer(callbacks=[callback], max_steps=1).fit(DomainClassifier(), batches(domain_data()))
    assert callback.head == "classifier"
    with pytest.raises(
        FishrInputError,
        match=r"Cannot tell which nn.Linear .*candidates are \['featurizer.0', 'out_a', 'out_b'\].*head=",
    ):
        trainer(callbacks=[FishrCallback()], max_steps=1).fit(TwoLinears(), batches(domain_data()))


def test_a_head_that_is_not_a_linear_layer_or_does_not_exist():
    with pytest.raises(FishrInputError, match="'featurizer' is a Sequential, not an nn.Linear"):
        trainer(callbacks=[FishrCallback(head="featurizer")], max_steps=1).fit(
            DomainClassifier(), batches(domain_data())
        )
    with pytest.raises(FishrInputError, match=r"no submodule 'model.fc'.*\['featurizer.0', 'classifier'\]"):
        trainer(callbacks=[FishrCallback(head="model.fc")], max_steps=1).fit(DomainClassifier(), batches(domain_data()))


def test_a_head_called_twice_in_one_step_is_an_error():
    class TwoForwards(DomainClassifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self.classifier(self.featurizer(x)), y) + self.classifier(self.featurizer(x)).mean()

    with pytest.raises(FishrInputError, match="ran 2 times in one training_step"):
        trainer(callbacks=[FishrCallback()], max_steps=1).fit(TwoForwards(), batches(domain_data()))


def test_a_batch_without_domains_is_an_error_that_says_how_to_fix_it():
    pairs = batches(TensorDataset(*domain_data().tensors[:2]))

    class PairModule(DomainClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    with pytest.raises(FishrInputError, match=r"Yield \(x, y, domain\) tuples .* targets_and_domains="):
        trainer(callbacks=[FishrCallback()], max_steps=1).fit(PairModule(), pairs)


def test_a_batch_missing_a_domain_is_an_error():
    dataset = domain_data()
    dataset.tensors[2][:BATCH] = torch.arange(BATCH) % 2  # the first batch has no domain 2
    with pytest.raises(FishrInputError, match=r"domain\(s\) \[2\] have \[0\] sample"):
        trainer(callbacks=[FishrCallback(num_domains=3)], max_steps=1).fit(DomainClassifier(), batches(dataset))


def test_manual_optimization_is_refused_with_the_mixin_as_the_way_out():
    class Manual(DomainClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(FishrInputError, match="manual optimization ignores. Use FishrMixin"):
        trainer(callbacks=[FishrCallback()], max_steps=1).fit(Manual(), batches(domain_data()))


def test_the_plain_lightning_example_runs_as_a_user_would():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "plain_lightning.py"
    done = subprocess.run(
        [sys.executable, str(example), "--steps", "30"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].split(":")[-1])
    assert 0.0 <= accuracy <= 1.0
