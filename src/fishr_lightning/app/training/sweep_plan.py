"""A multirun's jobs, derived and checked before the first one starts (issue 30).

Hydra's sweeper expands the override lists (``algorithm=erm,fishr test_envs=[0],[1]``) knowing nothing
of the dataset, so a fixed list of test domains cannot fit every dataset: ``+sweep=domainbed_loo`` held
out four domains everywhere, which died at its fourth job on a 3-domain dataset and silently skipped
two of DomainNet's six. Here ``test_envs`` may name a set of test domains derived from each job's
dataset (``TEST_ENV_SETS``), and every job's config is composed and checked as far as that is possible
without loading data; all the jobs that cannot run are named in one error, before any job starts.

The app's sweeper (``hydra_plugins.fishr_lightning_sweeper``, Hydra's basic sweeper with this step
between the expansion and the launch) calls ``plan_jobs``; it is a plain function so that the tests
can run it on configs composed with ``hydra.compose``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fishr_lightning import FishrInputError
from fishr_lightning.app import AppError
from fishr_lightning.app.data.specs import DatasetSpec, check_test_envs, dataset_spec


def single_test_envs(num_domains: int) -> Iterator[list[int]]:
    """Each domain held out alone: DomainBed's sweep.py with ``--single_test_envs``."""
    for env in range(num_domains):
        yield [env]


def all_test_env_combinations(num_domains: int) -> Iterator[list[int]]:
    """Every domain and every pair of domains, in DomainBed's order ([0], [0, 1], [0, 2], ..., [1], [1, 2], ...):
    its sweep.py without ``--single_test_envs``, the runs that leave-one-domain-out model selection needs."""
    for env in range(num_domains):
        yield [env]
        for other in range(env + 1, num_domains):
            yield [env, other]


# test_envs=NAME in a multirun: the test-domain sets of each job's dataset.
TEST_ENV_SETS: dict[str, Callable[[int], Iterator[list[int]]]] = {
    "each": single_test_envs,
    "leave_one_out": all_test_env_combinations,
}
# Plain integers that no config node interpolates: one composed config serves every value of them, so a
# 480-run sweep composes 8 configs, not 480 (Hydra's own check composed each job).
SEED_KEYS = ("hparams_seed", "trial_seed")
MAX_LISTED_JOBS = 10  # per problem


def job_test_envs(cfg: DictConfig):
    value = cfg.test_envs
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_list(value) else value


def job_dataset_and_test_envs(cfg: DictConfig | None) -> tuple[DatasetSpec | None, Any]:
    """The job's dataset and ``test_envs``; ``None`` for what its config cannot give (its problem says why)."""
    try:
        return dataset_spec(cfg.dataset.name, cfg.get("data_dir")), job_test_envs(cfg)
    except (AppError, OmegaConfBaseException, AttributeError):  # AttributeError: no config (composition failed)
        return None, None


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_test_envs(job: list[str], test_envs: Sequence[int]) -> list[str]:
    """The job with its ``test_envs`` override (or a new last one) set to these domains."""
    override = f"test_envs=[{','.join(str(env) for env in test_envs)}]"
    keys = [override_key(option) for option in job]
    if "test_envs" not in keys:
        return [*job, override]
    return [override if key == "test_envs" else option for key, option in zip(keys, job)]


def plan_jobs(jobs: Sequence[Sequence[str]], compose: Callable[[list[str]], DictConfig]) -> list[list[str]]:
    """The jobs to launch, in order: ``test_envs=each|leave_one_out`` replaced by one job per test-domain
    set of the job's dataset; or an ``AppError`` naming every job that cannot run (its number, as Hydra
    numbers them, its overrides, the problem) when there is one. ``compose(overrides)`` composes a job's
    config (the sweeper's config loader, as Hydra's launcher will)."""
    composed: dict[tuple[str, ...], tuple[DictConfig | None, str | None]] = {}
    planned: list[list[str]] = []
    problems: list[tuple[int, list[str], str]] = []
    for job in jobs:
        job = list(job)
        shared = tuple(override for override in job if override_key(override) not in SEED_KEYS)
        if shared not in composed:
            composed[shared] = checked_config(compose, list(shared))
        cfg, problem = composed[shared]
        spec, test_envs = job_dataset_and_test_envs(cfg)
        if spec is not None and isinstance(test_envs, str) and test_envs in TEST_ENV_SETS:
            variants = [(with_test_envs(job, envs), envs) for envs in TEST_ENV_SETS[test_envs](len(spec.environments))]
        else:
            variants = [(job, None)]
        for variant, envs in variants:
            variant_problem = problem or seed_problem(variant)
            if variant_problem is None and spec is not None and envs is not None:
                try:  # a pair on a 2-domain dataset leaves no training domain
                    check_test_envs(envs, spec)
                except AppError as error:
                    variant_problem = str(error)
            if variant_problem:
                problems.append((len(planned), variant, variant_problem))
            planned.append(variant)
    if problems:
        raise AppError(sweep_error(problems, len(planned)))
    return planned


def checked_config(compose: Callable[[list[str]], DictConfig], job: list[str]) -> tuple[DictConfig | None, str | None]:
    """The job's config and the first problem that the app would meet before loading data, if any."""
    from hydra.errors import HydraException

    try:
        cfg = compose(job)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra's message ends with its config search path, which says nothing to the user here.
        return None, " ".join(str(error).split("Config search path:")[0].split())
    try:
        check_job_config(cfg)
    except (AppError, FishrInputError, OmegaConfBaseException) as error:
        return cfg, str(error)
    return cfg, None


def check_job_config(cfg: DictConfig) -> None:
    """The checks of ``train`` that need no data and no device: the options, the dataset and its test
    domains (unless ``test_envs`` names a set), the hyperparameters."""
    # run.py imports torch and Lightning; the sweeper runs in the app's process, which holds them already.
    from fishr_lightning.app.training.config_checks import check_top_level_keys
    from fishr_lightning.app.training.run import check_run_options, data_options, is_positive_int, resolve_hparams
    from fishr_lightning.app.training.run_directory import check_ckpt_path_option

    check_top_level_keys(cfg)
    test_envs = job_test_envs(cfg)
    if not (isinstance(test_envs, str) and test_envs in TEST_ENV_SETS):
        check_test_envs(test_envs, dataset_spec(cfg.dataset.name, cfg.get("data_dir")))
    else:
        dataset_spec(cfg.dataset.name, cfg.get("data_dir"))
    check_run_options(cfg)
    check_ckpt_path_option(cfg.ckpt_path)
    data_options(cfg)
    hparams = resolve_hparams(cfg)
    if not is_positive_int(hparams["batch_size"]):
        raise AppError(f"batch_size={hparams['batch_size']}: it is the number of samples per training domain and step.")


def seed_problem(job: Sequence[str]) -> str | None:
    """``hparams_seed`` and ``trial_seed`` are left out of the composed configs (``SEED_KEYS``): checked here."""
    for override in job:
        key, _, value = override.partition("=")
        if override_key(override) in SEED_KEYS and not re.fullmatch(r"-?\d+", value.strip()):
            return f"{key.lstrip('+~')}={value}: an integer (e.g. {key.lstrip('+~')}=0)."
    return None


def sweep_error(problems: list[tuple[int, list[str], str]], num_jobs: int) -> str:
    """One error: each problem once (a typo shared by a 1200-run sweep is one line), with the jobs it stops."""
    jobs_by_problem: dict[str, list[tuple[int, list[str]]]] = {}
    for number, job, problem in problems:
        jobs_by_problem.setdefault(problem, []).append((number, job))
    lines = [
        f"{len(problems)} of the sweep's {num_jobs} jobs cannot run, so none was started (the job numbers are "
        "Hydra's, from 0):"
    ]
    for problem, jobs in jobs_by_problem.items():
        lines.append(f"  - {problem}")
        lines += [f"      job {number}: {' '.join(job)}" for number, job in jobs[:MAX_LISTED_JOBS]]
        if len(jobs) > MAX_LISTED_JOBS:
            lines.append(f"      ... and {len(jobs) - MAX_LISTED_JOBS} more jobs")
    lines.append(
        "Change or drop these overrides; for the test domains, test_envs=each (every domain alone) or "
        "test_envs=leave_one_out (every domain and every pair) derive them from each job's dataset."
    )
    return "\n".join(lines)
