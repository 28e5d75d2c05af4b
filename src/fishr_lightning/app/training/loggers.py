"""The app's Lightning logger (``configs/logger/``: csv, tensorboard, wandb, mlflow; issue 30): made with
the run directory as its place, refused in one paragraph with its install command when its optional
package is missing, and W&B's run finished with the app's run, so that the next run of a sweep (the
same process under Hydra's basic launcher) gets a run of its own. The records' accuracies reach it from
``evaluation.py`` (``acc/env0_in``, ...)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from omegaconf import DictConfig

from fishr_lightning.app import AppError

# What a logger class (the last part of a _target_) imports, any one of the modules, and the extra of
# pyproject.toml that installs it. Lightning's own error is a ModuleNotFoundError that Hydra wraps in
# "Error in call to target ...", with no word of the project's extras.
LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "WandbLogger": (("wandb",), "wandb"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "mlflow_logger": (("mlflow",), "mlflow"),
}


def instantiate_logger(node: DictConfig | None, run_dir: Path) -> Logger | None:
    """The logger of ``cfg.logger``, with ``save_dir`` the run directory."""
    if node is None:
        return None
    name = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    modules, extra = LOGGER_PACKAGES.get(name, ((), None))
    if modules and not any(importlib.util.find_spec(module) for module in modules):
        raise AppError(
            f"The logger {name} needs the {modules[0]} package, which is not installed: "
            f'pip install "fishr-lightning[{extra}]" (or pip install {modules[0]}), or choose another logger '
            "(logger=csv, the default, needs nothing)."
        )
    return instantiate(node, save_dir=str(run_dir))


def mlflow_logger(
    save_dir: str,
    experiment_name: str = "fishr-lightning",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    **kwargs: Any,
) -> MLFlowLogger:
    """Lightning's ``MLFlowLogger`` (``logger=mlflow``), by default with a local file store under the run
    directory, ``<save_dir>/mlruns`` (``mlflow ui --backend-store-uri <run dir>/mlruns`` shows it);
    ``tracking_uri`` or ``$MLFLOW_TRACKING_URI``: that server or store instead. Lightning's own default,
    ``file:<save_dir>``, would spread MLflow's experiment folders over the run directory."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"file:{Path(save_dir) / 'mlruns'}"
    if tracking_uri.startswith("file:"):
        # MLflow 3.x refuses its file store ("maintenance mode") unless this is set; the other local
        # store, SQLite, needs SQLAlchemy, which mlflow-skinny (the project's extra) does not install.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, **kwargs)


def finish_loggers(trainer: pl.Trainer) -> None:
    """Finishes W&B's run after the fit: Lightning's ``WandbLogger.finalize`` leaves it open in the
    process, and the next ``WandbLogger`` of the process would log into it (Lightning warns "There is a
    wandb run already in progress ... will reuse this run")."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None and any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        wandb.finish()
