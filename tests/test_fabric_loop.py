"""examples/fabric_loop.py: a Fabric loop with FishrPenalty and FishrSchedule trains to the weights
of the Trainer with FishrCallback."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from lightning.fabric import Fabric
from test_callback import DomainClassifier, assert_same_weights, batches, domain_data, trainer

from fishr_lightning import FishrCallback, FishrPenalty, FishrSchedule

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fabric_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fabric_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fabric_loop_ends_on_the_weights_of_trainer_and_callback():
    example = load_example()
    with_trainer = DomainClassifier("adam", 0.01)
    trainer(callbacks=[FishrCallback(penalty_weight=50.0, warmup_steps=2, ema=0.9)]).fit(
        with_trainer, batches(domain_data())
    )

    with_fabric = DomainClassifier("adam", 0.01)
    # The module is float64 already. Not precision="64-true": Fabric casts a forward's outputs back to
    # the default dtype (float32), which would put the features and logits Fishr sees in float32.
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(
        example.FeaturesAndLogits(with_fabric.featurizer, with_fabric.classifier),
        with_fabric.configure_optimizers(),
    )
    example.train(
        fabric,
        model,
        optimizer,
        batches(domain_data()),
        FishrPenalty(ema=0.9),
        FishrSchedule(50.0, warmup_steps=2),
        max_steps=6,
    )
    assert_same_weights(with_fabric, with_trainer)


def test_the_fabric_example_runs_as_a_user_would():
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 60 steps over 3 domains" in done.stdout
