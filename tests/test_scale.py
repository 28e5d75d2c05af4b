"""Scale and speed on CPU: compiled backbones, the app in mixed precision (under DDP: test_app_ddp.py), and the
overhead benchmark at a tiny size (it must run; its figures belong in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from test_app_train import SMALL_SYNTHETIC, records, run_app
from test_callback import DomainClassifier, assert_same_weights, batches, domain_data, trainer

from fishr_lightning import FishrCallback

REPO = Path(__file__).resolve().parents[1]
FISHR = dict(penalty_weight=50.0, warmup_steps=2, ema=0.9)


class ForwardClassifier(DomainClassifier):
    """Its training_step goes through forward, the method Lightning compiles in a compiled module."""

    def forward(self, x):
        return self.classifier(self.featurizer(x))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)


def eager_reference(module_class=DomainClassifier):
    model = module_class()
    trainer(callbacks=[FishrCallback(**FISHR)]).fit(model, batches(domain_data()))
    return model


def test_a_compiled_backbone_trains_to_the_eager_weights():
    model = DomainClassifier()
    model.featurizer = torch.compile(model.featurizer)
    trainer(callbacks=[FishrCallback(**FISHR)]).fit(model, batches(domain_data()))
    assert_same_weights(model, eager_reference())


def test_a_compiled_module_with_the_head_inside_forward_trains_to_the_eager_weights():
    model = ForwardClassifier()
    trainer(callbacks=[FishrCallback(**FISHR)]).fit(torch.compile(model), batches(domain_data()))
    assert_same_weights(model, eager_reference(ForwardClassifier))


def test_the_app_trains_fishr_in_bf16_mixed_precision(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    status = run_app(
        monkeypatch,
        run_dir,
        "algorithm=fishr",
        "trainer.precision=bf16-mixed",
        *SMALL_SYNTHETIC,
        "steps=4",
        "checkpoint_freq=2",
        "+hparams.penalty_anneal_iters=1",
        "+hparams.lambda=10",
    )
    assert status == 0
    last = records(run_dir)[-1]
    assert torch.isfinite(torch.tensor(last["penalty"])) and last["loss"] > last["nll"]


def test_the_overhead_benchmark_runs_at_a_tiny_size(tmp_path):
    spec = importlib.util.spec_from_file_location("overhead", REPO / "benchmarks" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = overhead  # its dataclasses look their module up there
    spec.loader.exec_module(overhead)
    output = tmp_path / "overhead.md"
    overhead.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--in-process",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--output",
            str(output),
        ]
    )
    table = output.read_text()
    for setting in ("PACS-tiny", "DomainNet-tiny"):
        for mode in ("erm", "closed_form", "backpack"):
            assert f"| {setting} |" in table and f"| {mode} |" in table
    assert "backpack / closed_form" in table and "full / closed_form" in table  # issue 26
    assert "| 0 |" in table.split("Data pipeline")[1]  # images/s with the loader in the main process


def test_the_evaluation_benchmark_runs_at_a_tiny_size(capsys):
    spec = importlib.util.spec_from_file_location("evaluation_benchmark", REPO / "benchmarks" / "evaluation.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--images-per-class", "1", "--image-size", "32", "--evaluations", "2", "--workers", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "images/s" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| per split, re-created (DomainBed)",
        "| one, workers kept (the app)",
    ]
