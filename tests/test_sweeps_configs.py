"""The ready sweep configs: `+sweep=domainbed` is the issue's long command, in one word."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def sweep_config(name: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"+sweep={name}"], return_hydra_config=True).hydra


def job_overrides(params) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for these sweeper params."""
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


def test_domainbed_sweep_is_the_protocol_in_one_word():
    hydra_config = sweep_config("domainbed")
    assert dict(hydra_config.sweeper.params) == {
        "dataset": "pacs",
        "algorithm": "erm,fishr",
        "test_envs": "[0],[1],[2],[3]",
        "hparams_seed": "range(0,20)",
        "trial_seed": "0,1,2",
    }
    jobs = job_overrides(hydra_config.sweeper.params)
    assert len(jobs) == 2 * 4 * 20 * 3
    assert ["dataset=pacs", "algorithm=fishr", "test_envs=[3]", "hparams_seed=19", "trial_seed=2"] in jobs
    # Deterministic run directories: named by the overrides, never by the time or the job number.
    assert hydra_config.sweep.dir == "sweeps/domainbed"
    assert OmegaConf.to_container(hydra_config.sweep)["subdir"] == "${hydra.job.override_dirname}"
    assert {"sweep", "trainer", "trainer.devices", "trainer.strategy", "data_dir"} <= set(
        hydra_config.job.config.override_dirname.exclude_keys
    )


@pytest.mark.parametrize(
    ("name", "runs", "test_envs"),
    [
        ("domainbed_loo", 2 * 10 * 20 * 3, "[0],[1],[2],[3],[0,1],[0,2],[0,3],[1,2],[1,3],[2,3]"),
        ("tiny", 2 * 2 * 2, "[0]"),
        ("comparison", 9 * 4 * 20 * 3, "[0],[1],[2],[3]"),
        ("tiny_comparison", 9 * 2 * 1, "[0]"),
    ],
)
def test_derived_sweeps(name, runs, test_envs):
    hydra_config = sweep_config(name)
    assert hydra_config.sweeper.params.test_envs == test_envs
    assert len(job_overrides(hydra_config.sweeper.params)) == runs
    assert hydra_config.sweep.dir == f"sweeps/{name}"
    assert OmegaConf.to_container(hydra_config.sweep)["subdir"] == "${hydra.job.override_dirname}"
