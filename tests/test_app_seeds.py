"""DomainBed's seeds (issue 19): a ``domainbed*`` sweep gives each run DomainBed's ``sweep.py`` seed,
``seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)``, which drives initialisation,
batches and the Colored/Rotated MNIST construction; a single run keeps ``seed=0`` (DomainBed's
``train.py`` default)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_app_train import run_app

from fishr_lightning.app import AppError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def domainbed_seed(*args) -> int:
    """DomainBed's misc.seed_hash, written out: md5 of the arguments' tuple as a string, mod 2**31."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


@pytest.mark.parametrize(("sweep", "seed"), [(None, 0), ("domainbed", "domainbed"), ("tiny", "domainbed")])
def test_single_runs_keep_seed_0_and_the_domainbed_presets_ask_for_domainbeds(sweep, seed):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={sweep}"] if sweep else [])
    assert cfg.seed == seed


def test_the_domainbed_seed_drives_initialisation_batches_and_the_mnist_construction(monkeypatch, tmp_path):
    seen = {}

    def stop_at_load_domains(name, data_dir, **kwargs):
        seen["data"] = kwargs["seed"]
        raise AppError("stopped by the test after seeding")

    monkeypatch.setattr("fishr_lightning.app.training.run.load_domains", stop_at_load_domains)
    monkeypatch.setattr(
        "fishr_lightning.app.training.run.pl.seed_everything", lambda seed, **kwargs: seen.setdefault("global", seed)
    )
    options = ["dataset=colored_mnist", "algorithm=erm", "test_envs=[1]", "hparams_seed=2", "trial_seed=1"]
    assert run_app(monkeypatch, tmp_path / "run", *options, "seed=domainbed") == 2
    expected = domainbed_seed("ColoredMNIST", "ERM", [1], 2, 1)
    assert seen == {"global": expected, "data": expected}
