"""Each comparison-set callback trains exactly as DomainBed's update() (tests/baselines_reference.py):
the same initial weights and batches through a real Trainer.fit, for steps that cross IRM's and
V-REx's annealing step, give the same weights (float64) and log DomainBed's returned penalties."""

from __future__ import annotations

import copy
import warnings

import baselines_reference as ref
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning import FishrCallback, FishrInputError
from fishr_lightning.baselines import (
    CORALCallback,
    GroupDROCallback,
    IRMCallback,
    MMDCallback,
    SDCallback,
    VRExCallback,
)
from fishr_lightning.head_penalty import fit_steps
from fishr_lightning.schedule import PenaltyScheduleWarning

E, B, STEPS, LR, ANNEAL = 3, 8, 5, 0.02, 2

# (DomainBed's name, callback, DomainBed's hyperparameters, DomainBed's returned value the callback logs)
ALGORITHMS = {
    "IRM": (IRMCallback, {"irm_lambda": 10.0, "irm_penalty_anneal_iters": ANNEAL}, "penalty"),
    "VREx": (VRExCallback, {"vrex_lambda": 10.0, "vrex_penalty_anneal_iters": ANNEAL}, "penalty"),
    "CORAL": (CORALCallback, {"mmd_gamma": 5.0}, "penalty"),
    "MMD": (MMDCallback, {"mmd_gamma": 5.0}, "penalty"),
    "GroupDRO": (GroupDROCallback, {"groupdro_eta": 0.5}, "loss"),
    "SD": (SDCallback, {"sd_reg": 0.1}, "penalty"),
}


class DomainClassifier(pl.LightningModule):
    """A user's plain module: featurizer, then the final nn.Linear `classifier`, one forward per step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.featurizer = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.classifier = nn.Linear(8, 3)
        self.double()

    def training_step(self, batch, batch_idx):
        x, y, _domains = batch
        return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR)


class DictOutputs(DomainClassifier):
    """The app's module's output: the loss and the cross-entropy, whose records follow DomainBed's returned dict."""

    def training_step(self, batch, batch_idx):
        nll = super().training_step(batch, batch_idx)
        return {"loss": nll, "nll": nll.detach()}


class RecordedLosses(Callback):
    """What the app records of each step (``step_losses``): DomainBed's ``loss``, ``nll`` and penalties."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from fishr_lightning.app.training.evaluation import step_losses

        self.values.append(step_losses(outputs, trainer))


def dataset(steps=STEPS, seed=1):
    """Each step's batch: one contiguous block of B samples per domain, domains shifted apart."""
    g = torch.Generator().manual_seed(seed)
    domains = torch.arange(E).repeat_interleave(B).repeat(steps)
    x = torch.randn(len(domains), 5, generator=g, dtype=torch.float64) + domains[:, None]
    y = torch.randint(0, 3, (len(domains),), generator=g)
    return TensorDataset(x, y, domains)


def minibatches_of_each_step(data):
    x, y, _ = data.tensors
    for rows in torch.arange(len(y)).split(E * B):
        yield [(xb, yb) for xb, yb in zip(x[rows].split(B), y[rows].split(B))]


class RecordLogged(Callback):
    def __init__(self, key):
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics[self.key]))


def fit(module, callbacks, data, loader=None, ckpt_path=None, **options):
    options = {"max_steps": STEPS, **options}
    options = {"precision": "64-true", **options}
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )
    trainer.fit(
        module,
        loader or DataLoader(data, batch_size=len(data) // options["max_steps"], shuffle=False),
        ckpt_path=ckpt_path,
    )
    return trainer


def domainbed(name, module, data, hparams):
    algorithm = ref.DomainBedAlgorithm(
        name, copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier), hparams, LR
    )
    returned = [algorithm.update(minibatches) for minibatches in minibatches_of_each_step(data)]
    return algorithm, returned


def assert_same_weights(module, algorithm, rtol=1e-9):
    for ours, theirs in ((module.featurizer, algorithm.featurizer), (module.classifier, algorithm.classifier)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_callback_trains_as_domainbeds_update(name):
    callback_class, hparams, returned_key = ALGORITHMS[name]
    data = dataset()
    module = DictOutputs()
    algorithm, returned = domainbed(name, module, data, hparams)
    callback = callback_class(**hparams, head="classifier")
    logged, recorded = RecordLogged(f"{callback.name}/penalty"), RecordedLosses()
    fit(module, [callback, logged, recorded], data)
    assert_same_weights(module, algorithm)
    assert logged.values == pytest.approx([r[returned_key] for r in returned], rel=1e-9, abs=1e-12)
    # The app's records mean what DomainBed's returned dict means (issue 25): `loss` is the cross-entropy
    # alone for CORAL, MMD and SD, the objective for IRM and V-REx, the robust loss for GroupDRO (no penalty).
    for ours, theirs in zip(recorded.values, returned, strict=True):
        assert set(theirs) <= set(ours) and ("penalty" in ours) is ("penalty" in theirs)
        for key in theirs:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key
    assert type(module).training_step is DictOutputs.training_step and "training_step" not in vars(module)


def test_irm_and_vrex_weigh_one_before_annealing_then_lambda():
    data = dataset()
    for callback in (IRMCallback(10.0, ANNEAL), VRExCallback(7.0, ANNEAL)):
        weights = RecordLogged(f"{callback.name}/weight")
        fit(DomainClassifier(), [callback, weights], data)
        assert weights.values == [1.0, 1.0] + [callback.schedule.penalty_weight] * (STEPS - ANNEAL)
        assert callback.schedule.last_reset_step == ANNEAL  # Adam re-created at the annealing step


def test_groupdro_resumed_from_a_checkpoint_ends_on_the_uninterrupted_weights(tmp_path):
    """GroupDRO's q carries over steps: it is saved with the checkpoint, and a run resumed after epoch 1
    of 2 (three steps each) ends on the uninterrupted run's weights and q."""
    data = dataset(steps=3)
    loader = DataLoader(data, batch_size=E * B, shuffle=False)
    uninterrupted, uninterrupted_callback = DomainClassifier(), GroupDROCallback(0.5)
    fit(uninterrupted, [uninterrupted_callback], data, loader, max_steps=-1, max_epochs=2)

    first_epoch, callback = DomainClassifier(), GroupDROCallback(0.5)
    trainer = fit(first_epoch, [callback], data, loader, max_steps=-1, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    q = callback.q.clone()
    assert q.sum().item() == pytest.approx(1.0) and not torch.allclose(q, torch.full_like(q, 1 / E))
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)["callbacks"][callback.state_key]
    torch.testing.assert_close(saved["q"], q)

    resumed, resumed_callback = DomainClassifier(), GroupDROCallback(0.5)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="64-true",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[resumed_callback],
    )
    trainer.fit(resumed, loader, ckpt_path=tmp_path / "epoch1.ckpt")
    for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed_callback.q, uninterrupted_callback.q, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(resumed_callback.q, q)  # q moved on after the resume


def test_fishr_and_another_penalty_compose_each_with_its_schedule_and_logs():
    """Fishr + CORAL on one Trainer equal DomainBed-style Fishr with CORAL's penalty added by hand; the records
    keep each raw penalty under its own name, and `loss` is Fishr's objective without CORAL's term (issue 25)."""
    import fishr_reference

    data = dataset()
    module = DictOutputs()
    expected = copy.deepcopy(module)
    expected_records = []
    optimizer = torch.optim.Adam(expected.parameters(), lr=LR)
    fishr = fishr_reference.ReferenceFishr(E, ema=0.9)
    for step, minibatches in enumerate(minibatches_of_each_step(data)):
        if step == ANNEAL:  # Fishr's warm-up ends: Adam re-created
            optimizer = torch.optim.Adam(expected.parameters(), lr=LR)
        x, y = torch.cat([m[0] for m in minibatches]), torch.cat([m[1] for m in minibatches])
        domains = torch.arange(E).repeat_interleave(B)
        features = expected.featurizer(x)
        fishr_penalty = fishr(expected.classifier, features, y, domains)
        coral = ref.pairwise_mmd(list(features.split(B)), gaussian=False)
        nll = F.cross_entropy(expected.classifier(features), y)
        fishr_objective = nll + (50.0 * fishr_penalty if step >= ANNEAL else 0.0)
        loss = fishr_objective + 3.0 * coral
        expected_records.append(
            {
                "loss": fishr_objective.item(),
                "nll": nll.item(),
                "fishr_penalty": fishr_penalty.item(),
                "coral_penalty": coral.item(),
            }
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    logs = [RecordLogged(key) for key in ("fishr/penalty", "coral/penalty", "fishr/weight", "coral/weight")]
    recorded = RecordedLosses()
    fishr, coral = FishrCallback(penalty_weight=50.0, warmup_steps=ANNEAL, ema=0.9), CORALCallback(3.0)
    fit(module, [coral, fishr, *logs, recorded], data)  # CORAL innermost: Fishr's term still joins the loss
    assert_same_weights(module, expected)
    for ours, theirs in zip(recorded.values, expected_records, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert logs[2].values == [0.0] * ANNEAL + [50.0] * (STEPS - ANNEAL) and logs[3].values == [3.0] * STEPS
    assert logs[0].values != logs[1].values


def test_a_batch_without_every_domain_is_refused():
    data = dataset()
    data.tensors[2][:] = 0
    with pytest.raises(FishrInputError, match="every training domain"):
        fit(DomainClassifier(), [VRExCallback(num_domains=E)], data)


def test_under_bf16_mixed_every_penalty_is_computed_in_float32():
    class Float32Classifier(DomainClassifier):
        def __init__(self):
            super().__init__()
            self.float()

    data = TensorDataset(*(t.float() if t.is_floating_point() else t for t in dataset().tensors))
    callbacks = [cls(**hparams) for cls, hparams, _ in ALGORITHMS.values()]
    seen = []
    for callback in callbacks:
        original = callback.domain_penalty

        def domain_penalty(features, logits, *rest, original=original):
            seen.append((features.dtype, logits.dtype, torch.is_autocast_enabled("cpu")))
            return original(features, logits, *rest)

        callback.domain_penalty = domain_penalty
    fit(Float32Classifier(), callbacks, data, precision="bf16-mixed", max_steps=2)
    assert set(seen) == {(torch.float32, torch.float32, False)} and len(seen) == 2 * len(callbacks)
    finite = [torch.isfinite(torch.tensor(c.last_penalty)) for c in callbacks if not isinstance(c, GroupDROCallback)]
    assert len(finite) == len(callbacks) - 1 and all(finite)


# ----------------------------------------------- issue 25: one training domain, domain ids, errors


def test_coral_and_mmd_with_one_training_domain_train_as_erm():
    """DomainBed averages the alignment over pairs only `if nmb > 1`: one training domain is ERM, penalty 0
    (a leave-one-out pair run on a 3-domain dataset used to end in FishrInputError)."""
    x, y, _ = dataset(steps=2).tensors
    one_domain = TensorDataset(x, y, torch.zeros_like(y))
    module = DomainClassifier()
    erm = ref.DomainBedAlgorithm("ERM", copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier), {}, LR)
    for rows in torch.arange(len(y)).split(E * B):
        erm.update([(x[rows], y[rows])])
    logged = [RecordLogged("coral/penalty"), RecordLogged("mmd/penalty")]
    fit(module, [CORALCallback(5.0, num_domains=1), MMDCallback(5.0), *logged], one_domain, max_steps=2)
    assert_same_weights(module, erm, rtol=0)
    assert logged[0].values == logged[1].values == [0.0, 0.0]


def test_domain_ids_are_checked_as_fishr_checks_them():
    data = dataset(steps=2)
    data.tensors[2][5] = E  # an id past the given num_domains
    with pytest.raises(FishrInputError, match=rf"^VRExCallback: domain id {E} is outside \[0, {E}\)"):
        fit(DomainClassifier(), [VRExCallback(num_domains=E)], data, max_steps=2)
    # num_domains inferred from a first batch without the top domain: the next batch's top id is refused,
    # never left out of every later penalty.
    data = dataset(steps=2)
    data.tensors[2][: E * B][data.tensors[2][: E * B] == E - 1] = 0
    with pytest.raises(FishrInputError, match=rf"^CORALCallback: domain id {E - 1} is outside \[0, {E - 1}\)"):
        fit(DomainClassifier(), [CORALCallback()], data, max_steps=2)
    float_ids = TensorDataset(*dataset(steps=1).tensors[:2], dataset(steps=1).tensors[2].double())
    with pytest.raises(FishrInputError, match="Domain ids must be an integer tensor"):
        fit(DomainClassifier(), [GroupDROCallback()], float_ids, max_steps=1)


def test_callbacks_name_themselves_in_errors_and_sd_reads_no_domain_ids():
    data = dataset(steps=1)
    with pytest.raises(FishrInputError, match="no submodule 'fc' to use as the IRMCallback head"):
        fit(DomainClassifier(), [IRMCallback(head="fc")], data, max_steps=1)

    class TwoTupleBatches(DomainClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.classifier(self.featurizer(x)), y)

    two_tuples = TensorDataset(*data.tensors[:2])
    with pytest.raises(FishrInputError, match="^MMDCallback needs each training sample's target and domain id"):
        fit(TwoTupleBatches(), [MMDCallback()], two_tuples, max_steps=1)
    sd = SDCallback(sd_reg=0.1)
    fit(TwoTupleBatches(), [sd], two_tuples, max_steps=1)  # (x, y) batches: SD needs no domain ids
    expected = DomainClassifier()
    torch.testing.assert_close(
        sd.last_penalty, expected.classifier(expected.featurizer(data.tensors[0])).pow(2).mean().item()
    )


def test_num_domains_that_differ_from_the_checkpoints_are_refused_on_load():
    callback = GroupDROCallback(num_domains=E)
    with pytest.raises(
        FishrInputError, match=rf"GroupDROCallback state is for {E + 1} training domains, but num_domains={E}"
    ):
        callback.load_state_dict({"last_reset_step": None, "num_domains": E + 1, "q": torch.ones(E + 1) / (E + 1)})
    inferred = IRMCallback()  # num_domains not given: the checkpoint's is taken
    inferred.load_state_dict({"last_reset_step": None, "num_domains": E + 1})
    assert inferred.num_domains == E + 1


def test_gradient_accumulation_warns_as_fishr_does():
    with pytest.warns(UserWarning, match="GroupDROCallback with accumulate_grad_batches=2.*q takes one"):
        fit(DomainClassifier(), [GroupDROCallback()], dataset(steps=2), max_steps=1, accumulate_grad_batches=2)


@pytest.mark.parametrize("callback_class", [IRMCallback, VRExCallback, GroupDROCallback])
def test_one_logit_bce_heads_are_refused_with_a_clear_message(callback_class):
    class BinaryHead(DomainClassifier):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(8, 1).double()

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            logits = self.classifier(self.featurizer(x))
            return F.binary_cross_entropy_with_logits(logits, (y[:, None] > 0).double())

    with pytest.raises(
        FishrInputError,
        match=rf"^{callback_class.__name__} computes DomainBed's cross-entropy.*"
        r"logits of shape \(24, 1\).*A one-logit BCE head is not supported",
    ):
        fit(BinaryHead(), [callback_class(num_domains=E)], dataset(steps=1), max_steps=1)


def warmup_warnings(callbacks, **limits):
    data = dataset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(DomainClassifier(), callbacks, data, DataLoader(data, batch_size=E * B), **limits)
    return [str(w.message) for w in record if issubclass(w.category, PenaltyScheduleWarning)]


def test_a_warmup_at_or_past_the_last_step_warns_once_per_callback():
    # Issue 30: FishrCallback(warmup_steps=1500) in a 96-step fit logged fishr/weight 0.0 throughout, no word.
    # A fit of one epoch of STEPS batches (its length from the epochs' batches): two warm-ups past its end.
    fishr, irm = FishrCallback(warmup_steps=9, penalty_weight=1000.0), IRMCallback(irm_penalty_anneal_iters=5)
    messages = warmup_warnings([fishr, irm], max_steps=-1, max_epochs=1)
    run = "is at or past the last optimizer step of this run (5 steps: 0 to 4)"
    assert len(messages) == 2
    assert messages[0].startswith(f"FishrCallback's warmup_steps=9 {run}, so the penalty never gets its weight")
    assert (
        "fishr/weight stays 0 throughout instead of 1000. Lower warmup_steps below 4, or train for more "
        in (messages[0])
    )
    assert messages[1].startswith(f"IRMCallback's irm_penalty_anneal_iters=5 {run}")
    assert "irm/weight stays 1 throughout instead of 100." in messages[1]

    # max_steps=5 (the app's way): V-REx's anneal at the last step warns, IRM's before it does not.
    messages = warmup_warnings([VRExCallback(vrex_penalty_anneal_iters=4), IRMCallback(irm_penalty_anneal_iters=3)])
    assert len(messages) == 1 and messages[0].startswith(f"VRExCallback's vrex_penalty_anneal_iters=4 {run}")
    assert "vrex/weight stays 1 until that last step (4) instead of 10" in messages[0]
    assert fit_steps(pl.Trainer(max_epochs=-1, logger=False)) is None  # no step limit: nothing to compare with


class VRExWithEMAReference:
    """The Fishr paper's "V-REx with EMA" (Rame et al., ICML 2022, Tables 9-10), written from its fork of
    DomainBed (github.com/alexrame/fishr): ``VREx.update`` with the domain risks put through Fishr's
    ``MovingAverage(ema, oneminusema_correction=True)`` before the variance; the ERM term is this step's
    mean risk, Adam re-created at the annealing step."""

    def __init__(self, module, vrex_lambda, anneal_iters, ema):
        self.featurizer, self.classifier = copy.deepcopy(module.featurizer), copy.deepcopy(module.classifier)
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.vrex_lambda, self.anneal_iters, self.ema = vrex_lambda, anneal_iters, ema
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=LR)
        self.update_count, self.updates, self.previous = 0, 0, None

    def moving_average(self, data):  # misc.MovingAverage.update, on one tensor
        previous = torch.zeros_like(data) if self.updates == 0 else self.previous
        ema_data = self.ema * previous + (1 - self.ema) * data
        self.previous, self.updates = ema_data.clone().detach(), self.updates + 1
        return ema_data / (1 - self.ema)

    def update(self, minibatches):
        weight = self.vrex_lambda if self.update_count >= self.anneal_iters else 1.0
        all_logits = self.network(torch.cat([x for x, y in minibatches]))
        losses, idx = torch.zeros(len(minibatches), dtype=all_logits.dtype), 0
        for i, (x, y) in enumerate(minibatches):
            losses[i] = F.cross_entropy(all_logits[idx : idx + x.shape[0]], y)
            idx += x.shape[0]
        risks = self.moving_average(losses)
        penalty = ((risks - risks.mean()) ** 2).mean()
        loss = losses.mean() + weight * penalty
        if self.update_count == self.anneal_iters:
            self.optimizer = torch.optim.Adam(self.network.parameters(), lr=LR)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.update_count += 1
        return penalty.item()


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_vrex_with_an_ema_of_the_risks_trains_as_the_papers_ablation(ema):
    """Issue 26: VRExCallback(ema=...) ends on the reference's weights after K steps that cross the
    annealing step, logging its penalties; ema=0 is today's V-REx bit for bit, and ema=0.9 differs from it."""
    data = dataset()
    module = DomainClassifier()
    reference = VRExWithEMAReference(module, 10.0, ANNEAL, ema)
    penalties = [reference.update(minibatches) for minibatches in minibatches_of_each_step(data)]
    callback = VRExCallback(10.0, ANNEAL, head="classifier", ema=ema)
    logged = RecordLogged("vrex/penalty")
    fit(module, [callback, logged], data)
    assert_same_weights(module, reference)
    assert logged.values == pytest.approx(penalties, rel=1e-9, abs=1e-12)
    plain = DomainClassifier()
    fit(plain, [VRExCallback(10.0, ANNEAL, head="classifier")], data)
    same = all(torch.equal(a, b) for a, b in zip(module.parameters(), plain.parameters()))
    assert same is (ema == 0.0)
    assert (callback.risk_average is None) is (ema == 0.0)


def test_vrex_with_ema_resumed_from_a_checkpoint_ends_on_the_uninterrupted_weights(tmp_path):
    """The risks' moving average is saved with the checkpoint: resumed after epoch 1 of 2 (three steps each),
    the run ends on the uninterrupted run's weights and average."""
    data = dataset(steps=3)
    loader = DataLoader(data, batch_size=E * B, shuffle=False)
    uninterrupted, uninterrupted_callback = DomainClassifier(), VRExCallback(10.0, 1, ema=0.9)
    fit(uninterrupted, [uninterrupted_callback], data, loader, max_steps=-1, max_epochs=2)

    first_epoch, callback = DomainClassifier(), VRExCallback(10.0, 1, ema=0.9)
    trainer = fit(first_epoch, [callback], data, loader, max_steps=-1, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    average = callback.risk_average.clone()
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)["callbacks"][callback.state_key]
    torch.testing.assert_close(saved["risk_average"], average)

    resumed, resumed_callback = DomainClassifier(), VRExCallback(10.0, 1, ema=0.9)
    fit(resumed, [resumed_callback], data, loader, max_steps=-1, max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed_callback.risk_average, uninterrupted_callback.risk_average, rtol=1e-12, atol=0)
    assert not torch.allclose(resumed_callback.risk_average, average)  # the average moved on after the resume


@pytest.mark.parametrize("ema", [1.0, -0.1, float("nan"), True, "0.9"])
def test_vrex_ema_outside_zero_one_is_refused(ema):
    with pytest.raises(FishrInputError, match=r"^VRExCallback: ema=.*a number in \[0, 1\): 0 \(the default\)"):
        VRExCallback(ema=ema)
