"""The logger presets beside csv and tensorboard (issue 30): ``logger=wandb`` runs offline and
``logger=mlflow`` keeps a local file store, both under the run directory, and a missing package is
refused with its extra. (The records' accuracies in the logger: tests/test_app_train.py and
tests/test_app_averaging.py read them back from the CSV logger's metrics.csv.)"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from hydra.core.global_hydra import GlobalHydra
from test_app_configs import compose_train

from fishr_lightning.app import AppError
from fishr_lightning.app.training import loggers
from fishr_lightning.app.training.loggers import finish_loggers, instantiate_logger


@pytest.fixture
def no_network(monkeypatch):
    """Connections out of this process fail (the local sockets of wandb's own service stay allowed)."""
    connect = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"the logger tried to reach {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def preset(name: str):
    GlobalHydra.instance().clear()
    try:
        return compose_train([f"logger={name}"]).logger
    finally:
        GlobalHydra.instance().clear()


def test_the_wandb_preset_logs_offline_into_the_run_directory(tmp_path, monkeypatch, no_network):
    wandb = pytest.importorskip("wandb", reason='pip install -e ".[dev]"')
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # not the user's home
        monkeypatch.setenv(variable, str(tmp_path / "home" / variable))
    monkeypatch.setenv("WANDB_MODE", "online")  # restored afterwards: Lightning sets it to dryrun
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    logger = instantiate_logger(preset("wandb"), run_dir)
    assert type(logger).__name__ == "WandbLogger" and logger.save_dir == str(run_dir)
    logger.log_metrics({"acc/env0_in": 0.5}, step=3)
    assert wandb.run is not None and wandb.run.settings.mode in ("offline", "dryrun")
    finish_loggers(SimpleNamespace(loggers=[logger]))
    assert wandb.run is None  # the next run of a sweep gets its own
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))


def test_the_mlflow_preset_keeps_a_file_store_in_the_run_directory(tmp_path, monkeypatch, no_network):
    pytest.importorskip("mlflow", reason='pip install -e ".[dev]"')
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, then removed: the preset must set it itself
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    run_dir = tmp_path / "run"
    logger = instantiate_logger(preset("mlflow"), run_dir)
    logger.log_metrics({"acc/env0_in": 0.5}, step=3)
    logger.finalize("success")
    (metric,) = (run_dir / "mlruns").glob("*/*/metrics/acc/env0_in")
    _, value, step = metric.read_text().split()  # MLflow's file store: "timestamp value step" per line
    assert (float(value), int(step)) == (0.5, 3)
    assert {path.name for path in run_dir.iterdir()} == {"mlruns"}


@pytest.mark.parametrize(("name", "extra"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_logger_whose_package_is_missing_is_refused_with_its_extra(tmp_path, monkeypatch, name, extra):
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(AppError, match=f'pip install "fishr-lightning\\[{extra}\\]"'):
        instantiate_logger(preset(name), tmp_path)
    assert not tmp_path.joinpath("wandb").exists()
