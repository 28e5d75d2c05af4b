"""SWAD: the loss valley on hand-computed traces (khanrc/swad's LossValley, quirks included), and
SWADCallback in Trainer.fit against a hand-written averaging loop (float64)."""

import copy
import itertools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fishr_lightning import FishrInputError, LossValley, SWADCallback
from fishr_lightning.averaging import LossValleyError, swad_window
from fishr_lightning.averaging.batchnorm_update import BatchNormUpdate

# -- the loss valley: (losses, n_converge, n_tolerance) -> (segments averaged, opened at, stopped at),
# each traced by hand from khanrc/swad's domainbed/swad.py (tolerance_ratio 0.3).
# A table: each comment belongs to its line, so the formatter leaves it as laid out.
# fmt: off
TRACES = {
    "never opens: the last segment alone": ([5, 4, 3, 2, 1], 3, 6, ((4,), None, None)),
    # Opens at evaluation 7 on segment 5 (threshold 1.3 * mean(5, 5.5, 6) = 7.15). The earlier window
    # [8, 7, 6, 5] goes back to segment 3 (the last above 7.15 is segment 2) but SWAD skips segment 3
    # and adds 4 and 5; segment 5 is added again when it becomes the oldest of the tolerance window;
    # the valley dies when the six latest losses are all 20.
    "opens with a full tolerance window": (
        [10, 9, 8, 7, 6, 5, 5.5, 6, 5.8, 6.1, 20, 20, 20, 20, 20, 20, 1],
        3, 6, ((4, 5, 5, 6, 7, 8, 9), 7, 15),
    ),
    # Opens at evaluation 2 on segment 0 (threshold 5.2): adds 1 and 2 at once, then segment 0 three
    # times while it stays the oldest of the filling tolerance window, then 1 and 2; dies at 8.
    "opens before the tolerance window is full": (
        [3, 4, 5, 6, 7, 8, 9, 30, 30, 30, 30], 3, 6, ((1, 2, 0, 0, 0, 1, 2), 2, 8),
    ),
    # Ends in the valley: the closing adds the window but its oldest while its minimum stays <= 5.2.
    "the run ends in the valley": ([3, 4, 5, 6], 3, 6, ((1, 2, 0, 1, 2), 2, None)),
    # n_tolerance == n_converge: the converge segment (1) only stands in, and is replaced.
    "equal windows": ([5, 4, 4.5, 4.8, 4.2, 9, 9, 9, 0], 3, 3, ((2, 3, 4), 3, 7)),
    # n_tolerance < n_converge: segments 1 and 2 of the converge window join at the opening.
    "tolerance shorter than convergence": ([1, 2, 3, 4, 9, 9], 4, 2, ((1, 2), 3, 4)),
    # Opens at the last evaluation and nothing joins: the converge segment alone.
    "only the converge segment": ([1, 5, 5], 3, 3, ((0,), 2, None)),
    "ties open the valley (the oldest minimum wins)": ([2, 2, 2], 3, 3, ((1, 2), 2, None)),
}
# fmt: on


@pytest.mark.parametrize("name", TRACES)
def test_loss_valley_on_hand_traced_losses(name):
    losses, n_converge, n_tolerance, (segments, opened, stopped) = TRACES[name]
    window = swad_window(losses, n_converge=n_converge, n_tolerance=n_tolerance, tolerance_ratio=0.3)
    assert (window.segments, window.converged_at, window.stopped_at) == (segments, opened, stopped)
    assert (window.start, window.end) == (segments[0], segments[-1])


def test_loss_valley_state_round_trips_mid_valley():
    losses = TRACES["opens with a full tolerance window"][0]
    whole = LossValley()
    for loss in losses[:12]:
        whole.update(loss)
    resumed, first_half = LossValley(), LossValley()
    for loss in losses[:9]:
        first_half.update(loss)
    resumed.load_state_dict(copy.deepcopy(first_half.state_dict()))
    for loss in losses[9:12]:
        resumed.update(loss)
    assert resumed.state_dict() == whole.state_dict()
    assert resumed.final_segments() == whole.final_segments()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_converge": 0}, "n_converge=0"),
        ({"n_tolerance": 2.5}, "n_tolerance=2.5"),
        ({"tolerance_ratio": -1}, "tolerance_ratio"),
    ],
)
def test_loss_valley_refuses_bad_settings(options, message):
    with pytest.raises(LossValleyError, match=message):
        LossValley(**options)


def test_loss_valley_refuses_a_non_finite_loss():
    with pytest.raises(LossValleyError, match="segment 1 is nan"):
        swad_window([1.0, float("nan")])


# -- SWADCallback in Trainer.fit ------------------------------------------------------------------

EVERY, BATCH, MAX_STEPS = 2, 8, 40  # a validation (a segment's end) every 2 optimizer steps


def training_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(MAX_STEPS * BATCH, 5, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (MAX_STEPS * BATCH,), generator=g))


class ScriptedValley(pl.LightningModule):
    """Logs a scripted validation loss (the k-th value at the k-th validation), so that the valley,
    and so the averaged segments, are known in advance; the weights train for real."""

    def __init__(self, losses, batchnorm=False, freeze_batchnorm=False):
        super().__init__()
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(7) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(5, 7), norm, nn.Tanh(), nn.Linear(7, 3)).double()
        self.losses, self.freeze_batchnorm = losses, freeze_batchnorm
        self.train()

    def forward(self, x):
        return self.net(x)

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_batchnorm:  # DomainBed's ResNets: BatchNorm statistics frozen during training
            for m in self.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.eval()
        return self

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", float(self.losses[self.trainer.global_step // EVERY - 1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def fit(module, steps, callbacks, ckpt_path=None, **kwargs):
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=EVERY,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        **kwargs,
    )
    val = DataLoader(TensorDataset(torch.zeros(1, 5, dtype=torch.float64)), batch_size=1)
    trainer.fit(module, DataLoader(training_data(), batch_size=BATCH), val, ckpt_path=ckpt_path)
    return trainer


def hand_swad(losses, steps, segments):
    """The reference: plain SGD, the weights after every step averaged per segment of EVERY steps,
    then the segments' averages averaged with the multiplicity SWAD gives them."""
    model = ScriptedValley(losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    after_each_step = []
    for x, y in itertools.islice(DataLoader(training_data(), batch_size=BATCH), steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        after_each_step.append([p.detach().clone() for p in model.parameters()])
    segment_means = [
        [torch.stack(ps).mean(0) for ps in zip(*after_each_step[k * EVERY : (k + 1) * EVERY])]
        for k in range(len(after_each_step) // EVERY)
    ]
    return [torch.stack([segment_means[s][i] for s in segments]).mean(0) for i in range(len(segment_means[0]))]


def assert_weights(module, expected, rtol=1e-9):
    for p, e in zip(module.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=rtol, atol=1e-12)


def test_the_averaged_weights_equal_a_hand_written_swad_loop():
    losses, _, _, (segments, _, _) = TRACES["the run ends in the valley"]
    steps = EVERY * len(losses)
    callback = SWADCallback(monitor="val_loss")
    fit(module := ScriptedValley(losses), steps, [callback])
    assert_weights(module, hand_swad(losses, steps, segments))
    assert callback.summary.status == "run ended in the valley: the averaging so far"
    assert (callback.summary.start_step, callback.summary.end_step) == (3, 6)  # segments 1..2: steps 3-6
    assert callback.summary.num_averaged_segments == len(segments) and not callback.summary.stopped_early


def test_the_valley_closing_stops_training_early():
    losses, _, _, (segments, _, stopped) = TRACES["opens before the tolerance window is full"]
    callback = SWADCallback(monitor="val_loss")
    trainer = fit(module := ScriptedValley(losses), EVERY * len(losses), [callback])
    assert trainer.global_step == EVERY * (stopped + 1)
    assert_weights(module, hand_swad(losses, EVERY * (stopped + 1), segments))
    assert callback.summary.status == "valley closed" and callback.summary.stopped_early


def test_without_early_stop_training_goes_on_and_the_valley_stays_closed():
    losses, _, _, (segments, _, stopped) = TRACES["opens before the tolerance window is full"]
    callback = SWADCallback(monitor="val_loss", early_stop=False)
    trainer = fit(module := ScriptedValley(losses), EVERY * len(losses), [callback])
    assert trainer.global_step == EVERY * len(losses)
    assert_weights(module, hand_swad(losses, EVERY * len(losses), segments))


def test_a_valley_that_never_opens_keeps_the_last_segment_and_says_so():
    losses, _, _, (segments, _, _) = TRACES["never opens: the last segment alone"]
    callback = SWADCallback(monitor="val_loss")
    with pytest.warns(UserWarning, match="SWAD's loss valley of 'val_loss' never opened in 5 evaluations"):
        trainer = fit(module := ScriptedValley(losses), EVERY * len(losses), [callback])
    assert_weights(module, hand_swad(losses, EVERY * len(losses), segments))
    assert callback.summary.status.startswith("valley never opened")
    # Fed by its caller (monitor=None, the app's way), it names no metric: not "of None" (issue 30).
    callback.monitor = None
    with pytest.warns(UserWarning) as record:
        callback.on_train_end(trainer, module)
    assert str(record[0].message).startswith("SWAD's loss valley never opened in 5 evaluations: the model keeps")


def test_a_run_resumed_mid_valley_ends_on_the_uninterrupted_weights(tmp_path):
    losses = TRACES["opens with a full tolerance window"][0]
    steps = EVERY * len(losses)
    # Saved after each validation (the segment closed), as the app's checkpoints are.
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=None)
    fit(uninterrupted := ScriptedValley(losses), steps, [SWADCallback(monitor="val_loss"), checkpoints])
    mid_valley = tmp_path / f"step={EVERY * 10}.ckpt"  # opened at 7, segments still pending
    assert mid_valley.exists()
    resumed_callback = SWADCallback(monitor="val_loss")
    fit(resumed := ScriptedValley(losses), steps, [resumed_callback], ckpt_path=str(mid_valley))
    assert_weights(resumed, [p.detach() for p in uninterrupted.parameters()], rtol=1e-12)
    assert resumed_callback.summary.status == "valley closed"


def test_one_callback_reused_for_a_second_fit_starts_afresh():
    losses, _, _, (segments, _, _) = TRACES["the run ends in the valley"]
    callback = SWADCallback(monitor="val_loss")
    fit(ScriptedValley(losses), EVERY * len(losses), [callback])
    fit(module := ScriptedValley(losses), EVERY * len(losses), [callback])
    assert_weights(module, hand_swad(losses, EVERY * len(losses), segments))


def test_trainable_batchnorm_statistics_are_recomputed_for_the_averaged_weights():
    losses, _, _, (segments, _, _) = TRACES["the run ends in the valley"]
    steps = EVERY * len(losses)
    callback = SWADCallback(monitor="val_loss", bn_update_batches=3)
    fit(module := ScriptedValley(losses, batchnorm=True), steps, [callback])
    reference = ScriptedValley(losses, batchnorm=True)
    with torch.no_grad():
        for p, q in zip(reference.parameters(), module.parameters()):
            p.copy_(q)
    first_batches = [x for (x, _y), _ in zip(DataLoader(training_data(), batch_size=BATCH), range(3))]
    torch.optim.swa_utils.update_bn(first_batches, reference)
    bn, expected = module.net[1], reference.net[1]
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=1e-9, atol=1e-12)
    assert callback.summary.batchnorm_batches == 3


def test_frozen_batchnorm_statistics_are_left_as_they_are():
    losses = TRACES["the run ends in the valley"][0]
    callback = SWADCallback(monitor="val_loss")
    fit(module := ScriptedValley(losses, batchnorm=True, freeze_batchnorm=True), EVERY * len(losses), [callback])
    torch.testing.assert_close(module.net[1].running_mean, torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(module.net[1].running_var, torch.ones(7, dtype=torch.float64))
    assert callback.summary.batchnorm_batches == 0


def test_a_monitored_loss_that_is_never_logged_is_an_error_naming_the_logged_ones():
    with pytest.raises(FishrInputError, match=r"monitors 'val/loss', but this validation logged only \['val_loss'\]"):
        fit(ScriptedValley([1, 2, 3]), 6, [SWADCallback(monitor="val/loss")])


def test_a_run_without_any_validation_is_an_error():
    with pytest.raises(FishrInputError, match="saw no validation during training"):
        fit(ScriptedValley([1]), 1, [SWADCallback(monitor="val_loss")])


def test_manual_optimization_is_refused():
    class Manual(ScriptedValley):
        def __init__(self):
            super().__init__([1, 2])
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.optimizers().step()

    with pytest.raises(FishrInputError, match="manual optimization"):
        fit(Manual(), 2, [SWADCallback(monitor="val_loss")])


def first_batches(n):
    return lambda trainer: itertools.islice(DataLoader(training_data(), batch_size=BATCH), n)


def test_fewer_batchnorm_batches_than_asked_is_a_warning_naming_the_number():
    losses = TRACES["the run ends in the valley"][0]
    callback = SWADCallback(monitor="val_loss", bn_update_batches=3, bn_batches=first_batches(2))
    with pytest.warns(UserWarning, match=r"on 2 training batch\(es\), fewer than the 3 asked for"):
        fit(ScriptedValley(losses, batchnorm=True), EVERY * len(losses), [callback])
    assert callback.summary.batchnorm_batches == 2


def test_no_batchnorm_batch_at_all_is_an_error_not_reset_statistics():
    losses = TRACES["the run ends in the valley"][0]
    callback = SWADCallback(monitor="val_loss", bn_batches=first_batches(0))
    with pytest.raises(FishrInputError, match="got no training batch to recompute the BatchNorm statistics"):
        fit(ScriptedValley(losses, batchnorm=True), EVERY * len(losses), [callback])


def test_batchnorm_update_after_lightnings_ema_recomputes_the_statistics_of_the_ema_weights():
    losses = TRACES["the run ends in the valley"][0]
    update = BatchNormUpdate(num_batches=3)
    fit(module := ScriptedValley(losses, batchnorm=True), EVERY * len(losses), [EMAWeightAveraging(decay=0.9), update])
    reference = copy.deepcopy(module)
    reference.net[1].reset_running_stats()
    torch.optim.swa_utils.update_bn(
        [x for x, _y in itertools.islice(DataLoader(training_data(), batch_size=BATCH), 3)], reference
    )
    torch.testing.assert_close(module.net[1].running_mean, reference.net[1].running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(module.net[1].running_var, reference.net[1].running_var, rtol=1e-9, atol=1e-12)
    assert update.batches_used == 3


def test_swad_is_a_plain_callback_whose_averaged_copy_holds_parameters_only():
    """Composition over AveragedModel (issue 18): no WeightAveraging state, and the copy is the
    parameters', not a deep copy of the LightningModule (its trainer, its wrapped training_step)."""
    callback = SWADCallback(monitor="val_loss")
    losses = TRACES["the run ends in the valley"][0]
    fit(module := ScriptedValley(losses), EVERY * len(losses), [callback])
    assert not isinstance(callback, WeightAveraging)
    assert [p.shape for p in callback._segment.module.parameters()] == [p.shape for p in module.parameters()]
    assert not any(isinstance(m, pl.LightningModule) for m in callback._segment.modules())


# -- half precision: the average in float32 (issue 25) -----------------------------------------------


class Drifting(pl.LightningModule):
    """Weights pushed by a constant gradient: each moves a few bfloat16 spacings per SGD step, the
    drift over a segment that an average kept in bfloat16 loses (its step's share falls under half a
    spacing)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.05, 0.5, -2.0, 12.0]))
        self.register_buffer("rate", torch.tensor([-1e-3, -1e-2, 2e-2, -0.2]))

    def training_step(self, batch, batch_idx):
        return (self.w * self.rate).sum() + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class SegmentsEvery(pl.Callback):
    """Ends SWAD's segment every ``every`` steps with the next scripted loss (as the app's valley loss
    does), and records the weights after each step in float64."""

    def __init__(self, swad, every, losses):
        self.swad, self.every, self.losses, self.weights = swad, every, losses, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.w.detach().double().clone())
        if trainer.global_step % self.every == 0:
            self.swad.end_segment(trainer, self.losses[trainer.global_step // self.every - 1])


def test_under_bf16_true_the_average_is_kept_in_float32_and_rounded_once():
    losses, _, _, (segments, _, _) = TRACES["the run ends in the valley"]
    every = 75
    swad = SWADCallback(monitor=None)
    segment_ends = SegmentsEvery(swad, every, losses)
    trainer = pl.Trainer(
        max_steps=every * len(losses),
        precision="bf16-true",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[swad, segment_ends],
    )
    trainer.fit(module := Drifting(), DataLoader(TensorDataset(torch.zeros(every * len(losses), 1))))
    # The reference: the weights seen at each step (bfloat16), averaged in float64 per segment, then over
    # the segments SWAD picks; the module's weights are that average rounded once to bfloat16.
    seen = torch.stack(segment_ends.weights)
    assert module.w.dtype == torch.bfloat16 and len(seen) == every * len(losses)
    assert seen[-1, 0] - seen[0, 0] > 0.2  # the weights did drift (each by dozens of spacings)
    segment_means = seen.reshape(len(losses), every, -1).mean(1)
    expected = segment_means[list(segments)].mean(0)
    torch.testing.assert_close(module.w.detach().double(), expected, rtol=2**-8, atol=0)
    saved = swad.state_dict()
    assert all(w.dtype == torch.float32 for w in [*saved["final"], *saved["segment"]["parameters"]])
    # A checkpoint written before issue 25 holds bfloat16 averages: a resume goes on in float32.
    saved["final"] = [w.bfloat16() for w in saved["final"]]
    (resumed := SWADCallback(monitor=None)).load_state_dict(saved)
    assert all(w.dtype == torch.float32 for w in resumed.state_dict()["final"])
