"""Hydra's basic sweeper with one step between the expansion of the override lists and the first launch:
``fishr_lightning.app.training.sweep_plan.plan_jobs`` derives ``test_envs=each|leave_one_out`` from each
job's dataset and checks every job, so that a sweep whose jobs cannot all run stops before its first
job with one ``error:`` naming them (issue 30).

Hydra imports every module of ``hydra_plugins`` whenever any Hydra app starts: the app is imported
only when a sweep runs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class FishrSweeper(BasicSweeper):
    def split_arguments(self, overrides: Any, max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        from fishr_lightning.app import AppError
        from fishr_lightning.app.training.sweep_plan import plan_jobs

        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        try:
            jobs = plan_jobs(jobs, self.compose_job)
        except AppError as error:  # before BasicSweeper.sweep makes the sweep directory
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)  # as the app's other errors (run.py)
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

    def compose_job(self, overrides: list[str]):
        assert self.hydra_context is not None and self.config is not None
        from omegaconf import open_dict, read_write

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]  # as Hydra's run_job hands the config to the app
        return cfg

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Nothing more: ``plan_jobs`` composed and checked every job."""
