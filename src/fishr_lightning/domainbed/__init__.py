"""DomainBed's algorithms as LightningModules, by DomainBed's names (issue 26)::

    from fishr_lightning.domainbed import build_algorithm, default_hparams, load_domainbed_state_dict
    module = build_algorithm("DANN", input_shape=(3, 224, 224), num_classes=7, num_domains=3,
                             hparams=default_hparams("DANN", "PACS"), featurizer=None, seed=0)
    trainer.fit(module, loader)   # batches (x, y, domain): the training domains' minibatches in domain order

Each algorithm is a short file next to its formula, on ``DomainBedAlgorithm`` (``algorithm.py``); its state
dict has DomainBed's keys, so DomainBed's ``model.pkl`` loads (``load_domainbed_state_dict``,
``load_domainbed_model``) and DomainBed loads ours (``domainbed_state_dict``). The callbacks of
``fishr_lightning.baselines`` stay for users' own modules.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "ALGORITHM_CLASSES",
    "DomainBedAlgorithm",
    "DomainBedError",
    "algorithm_class",
    "build_algorithm",
    "default_hparams",
    "domainbed_state_dict",
    "load_domainbed_model",
    "load_domainbed_state_dict",
    "random_hparams",
]

# Imported on first use (PEP 562): the registry is NumPy only.
_HOMES = {
    "ALGORITHM_CLASSES": "fishr_lightning.domainbed.registry",
    "DomainBedAlgorithm": "fishr_lightning.domainbed.algorithm",
    "DomainBedError": "fishr_lightning.domainbed.algorithm",
    "algorithm_class": "fishr_lightning.domainbed.registry",
    "build_algorithm": "fishr_lightning.domainbed.registry",
    "default_hparams": "fishr_lightning.domainbed.hparams_registry",
    "random_hparams": "fishr_lightning.domainbed.hparams_registry",
    "domainbed_state_dict": "fishr_lightning.domainbed.state_dict",
    "load_domainbed_model": "fishr_lightning.domainbed.state_dict",
    "load_domainbed_state_dict": "fishr_lightning.domainbed.state_dict",
}

if TYPE_CHECKING:
    from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, DomainBedError
    from fishr_lightning.domainbed.hparams_registry import default_hparams, random_hparams
    from fishr_lightning.domainbed.registry import ALGORITHM_CLASSES, algorithm_class, build_algorithm
    from fishr_lightning.domainbed.state_dict import (
        domainbed_state_dict,
        load_domainbed_model,
        load_domainbed_state_dict,
    )


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'fishr_lightning.domainbed' has no attribute {name!r}")
