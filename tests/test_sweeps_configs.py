"""The ready sweep configs: `+sweep=domainbed` is the issue's long command, in one word; their test
domains derived from each dataset's, and every job checked before the first starts (issue 30)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fishr_lightning.app import AppError
from fishr_lightning.app.data.specs import SYNTHETIC_SPEC, check_test_envs
from fishr_lightning.app.training.run import main
from fishr_lightning.app.training.sweep_plan import plan_jobs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def sweep_config(name: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"+sweep={name}"], return_hydra_config=True).hydra


def job_overrides(params) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for these sweeper params."""
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


def planned_jobs(name: str, *command_line: str) -> list[list[str]]:
    """The jobs the app's sweeper launches for `train.py -m +sweep=NAME COMMAND_LINE...`: Hydra's expansion of
    the preset's params and the command line, then the app's plan (sweep_plan.plan_jobs)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        overrides = [f"+sweep={name}", *command_line]
        params = compose("train", overrides=overrides, return_hydra_config=True).hydra.sweeper.params
        parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *overrides])
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
        return plan_jobs(jobs, lambda job: compose("train", overrides=job))


def domainbed_all_test_env_combinations(n):
    """DomainBed's domainbed/scripts/sweep.py, as written there: the test-domain sets of its sweep
    without --single_test_envs."""
    assert n >= 3
    for i in range(n):
        yield [i]
        for j in range(i + 1, n):
            yield [i, j]


@pytest.mark.parametrize(("dataset", "num_domains"), [("synthetic", 3), ("domain_net", 6)])
def test_leave_one_out_sweep_derives_the_test_domains_from_the_dataset(dataset, num_domains):
    jobs = planned_jobs("domainbed_loo", f"dataset={dataset}")
    expected = [
        [f"dataset={dataset}", f"algorithm={algorithm}", f"test_envs=[{','.join(map(str, envs))}]"]
        + [f"hparams_seed={hparams_seed}", f"trial_seed={trial_seed}", "+sweep=domainbed_loo"]
        for algorithm, envs, hparams_seed, trial_seed in itertools.product(
            ("erm", "fishr"), domainbed_all_test_env_combinations(num_domains), range(20), range(3)
        )
    ]
    assert len(expected) == 2 * (num_domains + num_domains * (num_domains - 1) // 2) * 20 * 3
    assert sorted(jobs) == sorted(expected)  # every job once: 1200 on a 4-domain dataset, 2520 on DomainNet


def test_each_holds_out_every_domain_of_the_dataset():
    jobs = planned_jobs("domainbed", "dataset=domain_net", "algorithm=fishr", "hparams_seed=0", "trial_seed=0")
    assert [job[2] for job in jobs] == [f"test_envs=[{env}]" for env in range(6)]


def test_a_test_domain_set_name_outside_a_sweep_is_an_error():
    with pytest.raises(AppError, match=r"test_envs=leave_one_out is not a list .* launch it with -m"):
        check_test_envs("leave_one_out", SYNTHETIC_SPEC)


def test_a_bad_multirun_fails_before_its_first_job_with_one_error(tmp_path, monkeypatch, capsys):
    """`fishr-train -m test_envs=[0],[3] steps=20,-1` on the 3-domain synthetic dataset: the three jobs that
    cannot run are named in one error, and nothing starts, not even the sweep directory."""
    sweep_dir = tmp_path / "sweep"
    GlobalHydra.instance().clear()
    monkeypatch.setattr(
        sys, "argv", ["fishr-train", "-m", "test_envs=[0],[3]", "steps=20,-1", f"hydra.sweep.dir={sweep_dir}"]
    )
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 2  # as the app's other errors
    output = capsys.readouterr()
    lines = output.err.strip().splitlines()
    assert (
        lines[0]
        == "error: 3 of the sweep's 4 jobs cannot run, so none was started (the job numbers are Hydra's, from 0):"
    )
    assert lines[1:4] == [
        "  - steps=-1: it is a number of optimizer steps, a positive integer (e.g. steps=300).",
        "      job 1: test_envs=[0] steps=-1",
        "  - test_envs=[3] is out of range: Synthetic has 3 domains (0=-90%, 1=+90%, 2=+80%); pass indices among "
        "them, e.g. test_envs=[0] or test_envs=[0,2].",
    ]
    assert lines[4:6] == ["      job 2: test_envs=[3] steps=20", "      job 3: test_envs=[3] steps=-1"]
    assert lines[6].startswith("Change or drop these overrides; for the test domains, test_envs=each")
    assert len(lines) == 7
    assert "run directory" not in output.out
    assert not sweep_dir.exists()


def test_domainbed_sweep_is_the_protocol_in_one_word():
    hydra_config = sweep_config("domainbed")
    assert dict(hydra_config.sweeper.params) == {
        "dataset": "pacs",
        "algorithm": "erm,fishr",
        "test_envs": "each",
        "hparams_seed": "range(0,20)",
        "trial_seed": "0,1,2",
    }
    jobs = planned_jobs("domainbed")
    assert len(jobs) == 2 * 4 * 20 * 3
    assert [
        "dataset=pacs",
        "algorithm=fishr",
        "test_envs=[3]",
        "hparams_seed=19",
        "trial_seed=2",
        "+sweep=domainbed",
    ] in jobs
    # Deterministic run directories: named by the overrides, never by the time or the job number.
    assert hydra_config.sweep.dir == "sweeps/domainbed"
    assert OmegaConf.to_container(hydra_config.sweep)["subdir"] == "${hydra.job.override_dirname}"
    assert {"sweep", "trainer", "trainer.devices", "trainer.strategy", "data_dir"} <= set(
        hydra_config.job.config.override_dirname.exclude_keys
    )


@pytest.mark.parametrize(
    ("name", "runs", "test_envs"),
    [  # the runs of Hydra's expansion, before test_envs=each|leave_one_out become one run per set (above)
        ("domainbed_loo", 2 * 20 * 3, "leave_one_out"),
        ("tiny", 2 * 2 * 2, "[0]"),
        ("comparison", 9 * 20 * 3, "each"),
        ("tiny_comparison", 9 * 2 * 1, "[0]"),
    ],
)
def test_derived_sweeps(name, runs, test_envs):
    hydra_config = sweep_config(name)
    assert hydra_config.sweeper.params.test_envs == test_envs
    assert len(job_overrides(hydra_config.sweeper.params)) == runs
    assert hydra_config.sweep.dir == f"sweeps/{name}"
    assert OmegaConf.to_container(hydra_config.sweep)["subdir"] == "${hydra.job.override_dirname}"


def test_the_sweep_error_names_each_problem_once():
    """A typo shared by 25 jobs is one problem with ten of its jobs; an unknown algorithm and a seed that is
    no integer are problems of their own."""
    jobs = [[f"hparams_seed={seed}", "+stpes=3"] for seed in range(25)] + [["algorithm=nosuch"], ["trial_seed=abc"]]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"), pytest.raises(AppError) as error:
        plan_jobs(jobs, lambda job: compose("train", overrides=job))
    lines = str(error.value).splitlines()
    assert lines[0].startswith("27 of the sweep's 27 jobs cannot run")
    assert (
        lines[1].startswith("  - Unknown option stpes: the app reads none of it")
        and "did you mean steps=3?" in lines[1]
    )
    assert lines[2:12] == [f"      job {seed}: hparams_seed={seed} +stpes=3" for seed in range(10)]
    assert lines[12] == "      ... and 15 more jobs"
    assert lines[13].startswith(
        "  - In 'train': Could not find 'algorithm/nosuch' Available options in 'algorithm': adrmx"
    )
    assert lines[13].endswith("urm vrex")  # without Hydra's config search path
    assert lines[14:17] == [
        "      job 25: algorithm=nosuch",
        "  - trial_seed=abc: an integer (e.g. trial_seed=0).",
        "      job 26: trial_seed=abc",
    ]
    assert len(lines) == 18


def test_the_paper_presets_sweep_the_papers_algorithms_and_datasets():
    """`+sweep=paper`: the Fishr paper's Tables 3-4, its 20 algorithms (configs named as DomainBed's, lowercased)
    on its 7 datasets, every test domain, 20 draws, 3 trials; `tiny_paper` the same algorithms in seconds."""
    from fishr_lightning.domainbed.names import PAPER_DATASETS, PAPER_TABLE_ROWS

    paper = sweep_config("paper").sweeper.params
    algorithms = paper.algorithm.split(",")
    assert sorted(algorithms) == sorted(name.lower() for name, _ in PAPER_TABLE_ROWS)
    assert {dataset_spec_name(d) for d in paper.dataset.split(",")} == set(PAPER_DATASETS)
    assert (paper.test_envs, paper.hparams_seed, paper.trial_seed) == ("each", "range(0,20)", "0,1,2")
    tiny = sweep_config("tiny_paper").sweeper.params
    assert tiny.algorithm.split(",") == [name for name in algorithms if name != "arm"] and tiny.dataset == "synthetic"
    assert (tiny.hparams_seed, tiny.trial_seed, tiny.steps) == ("0", "0", 6)


def dataset_spec_name(config_name: str) -> str:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"dataset={config_name}"]).dataset.name
