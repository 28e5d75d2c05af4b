"""``seed_hash``: DomainBed's stable seeds from any arguments, shared by the data and the registry."""

from __future__ import annotations

# In the core since the public DomainBatchSampler draws with it (issue 30); torch-free, as fishr-collect needs.
from fishr_lightning.seeds import seed_hash

__all__ = ["DOMAINBED_SEED", "domainbed_sweep_seed", "seed_hash"]


# The value of ``seed`` that asks for DomainBed's sweep seed (the ``domainbed*`` sweep presets set it).
DOMAINBED_SEED = "domainbed"


def domainbed_sweep_seed(dataset: str, algorithm: str, test_envs: list[int], hparams_seed: int, trial_seed: int) -> int:
    """The ``seed`` DomainBed's ``sweep.py`` gives each run: ``seed_hash(dataset, algorithm, test_envs,
    hparams_seed, trial_seed)``, with DomainBed's names (``"PACS"``, ``"Fishr"``) and ``test_envs`` a list."""
    return seed_hash(dataset, algorithm, list(test_envs), hparams_seed, trial_seed)
