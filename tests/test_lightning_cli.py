"""FishrCallback configured through LightningCLI, from YAML and from the command line."""

import importlib.util
from pathlib import Path

import pytest

from fishr_lightning import FishrCallback

pytest.importorskip("jsonargparse")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example():
    spec = importlib.util.spec_from_file_location("lightning_cli_example", EXAMPLES / "lightning_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fishr_callback(cli):
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, FishrCallback)]
    return callback


def test_fit_from_the_example_yaml(tmp_path):
    cli = load_example().main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "lightning_cli.yaml"),
            "--trainer.max_steps=4",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    callback = fishr_callback(cli)
    assert (callback.schedule.penalty_weight, callback.schedule.warmup_steps, callback.head) == (100.0, 5, "classifier")
    assert cli.trainer.global_step == 4 and callback.penalty.num_updates == 4


def test_fit_from_the_command_line(tmp_path):
    cli = load_example().main(
        [
            "fit",
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=fishr_lightning.FishrCallback",
            "--trainer.callbacks.penalty_weight=10",
            "--trainer.callbacks.warmup_steps=1",
            "--trainer.callbacks.ema=0.9",
            "--trainer.callbacks.param_reduction=sum",
        ]
    )
    callback = fishr_callback(cli)
    assert (callback.schedule.penalty_weight, callback.penalty.ema, callback.penalty.param_reduction) == (
        10.0,
        0.9,
        "sum",
    )
    assert callback.penalty.num_updates == 3 and cli.trainer.callback_metrics["fishr/weight"].item() == 10.0


@pytest.mark.parametrize("bad", ["--trainer.callbacks.penalty_weight=lots", "--trainer.callbacks.backend=jax"])
def test_the_cli_validates_the_callback_arguments(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        load_example().main(
            [
                "fit",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.callbacks+=fishr_lightning.FishrCallback",
                bad,
            ]
        )
    assert bad.split("=")[0].split(".")[-1] in capsys.readouterr().err
