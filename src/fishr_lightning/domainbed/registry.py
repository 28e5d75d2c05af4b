"""``build_algorithm``: DomainBed's algorithms by DomainBed's names (``domainbed/algorithms.py``'s
``ALGORITHMS``), each a ``DomainBedAlgorithm`` in its own short file of this package (issue 26)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from typing import Any

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, DomainBedError, FeaturizerFactory
from fishr_lightning.domainbed.names import DOMAINBED_ALGORITHMS

# DomainBed's name -> "module:class" of this package; imported on first use.
ALGORITHM_CLASSES: dict[str, str] = {
    "ERM": "erm:ERM",
    "ERMPlusPlus": "ermplusplus:ERMPlusPlus",
    "Fish": "fish:Fish",
    "IRM": "irm:IRM",
    "GroupDRO": "groupdro:GroupDRO",
    "Mixup": "mixup:Mixup",
    "MLDG": "mldg:MLDG",
    "CORAL": "mmd:CORAL",
    "MMD": "mmd:MMD",
    "DANN": "dann:DANN",
    "CDANN": "dann:CDANN",
    "MTL": "mtl:MTL",
    "SagNet": "sagnet:SagNet",
    "ARM": "arm:ARM",
    "VREx": "vrex:VREx",
    "RSC": "rsc:RSC",
    "SD": "sd:SD",
    "ANDMask": "gradient_masks:ANDMask",
    "SANDMask": "gradient_masks:SANDMask",
    "IGA": "iga:IGA",
    "SelfReg": "selfreg:SelfReg",
    "Fishr": "fishr:Fishr",
    "TRM": "trm:TRM",
    "IB_ERM": "information_bottleneck:IB_ERM",
    "IB_IRM": "information_bottleneck:IB_IRM",
    "CAD": "cad:CAD",
    "CondCAD": "cad:CondCAD",
    "Transfer": "transfer:Transfer",
    "CausIRL_CORAL": "causirl:CausIRL_CORAL",
    "CausIRL_MMD": "causirl:CausIRL_MMD",
    "EQRM": "eqrm:EQRM",
    "RDM": "rdm:RDM",
    "ADRMX": "adrmx:ADRMX",
    "URM": "urm:URM",
}


def algorithm_class(name: str) -> type[DomainBedAlgorithm]:
    """The class of DomainBed's algorithm ``name``; an unknown name is an error listing the known ones."""
    if name not in ALGORITHM_CLASSES:
        pending = [other for other in DOMAINBED_ALGORITHMS if other not in ALGORITHM_CLASSES]
        close = [known for known in ALGORITHM_CLASSES if known.lower() == name.lower()]
        hint = f" Did you mean {close[0]!r}? Names are DomainBed's, case included." if close else ""
        raise DomainBedError(
            f"No DomainBed algorithm {name!r} here.{hint} Available: {', '.join(ALGORITHM_CLASSES)}"
            + (f"; DomainBed's not yet here: {', '.join(pending)}." if pending else ".")
        )
    module_name, class_name = ALGORITHM_CLASSES[name].split(":")
    return getattr(import_module(f"fishr_lightning.domainbed.{module_name}"), class_name)


def build_algorithm(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    num_domains: int,
    hparams: dict[str, Any],
    featurizer: FeaturizerFactory | None = None,
    seed: int = 0,
) -> DomainBedAlgorithm:
    """DomainBed's ``algorithm_class(name)(input_shape, num_classes, num_domains, hparams)`` as a
    LightningModule trained by ``trainer.fit`` on batches ``(x, y, domain)``.

    Args:
        name: DomainBed's name (``"DANN"``, ``"Fishr"``...).
        input_shape: the inputs' shape, e.g. ``(3, 224, 224)``.
        num_classes: classes of the dataset.
        num_domains: training domains.
        hparams: DomainBed's dict (``default_hparams(name, dataset)`` or its ``hparams_registry``'s): every
            key it has; keys the algorithm does not read are ignored.
        featurizer: ``(input_shape, hparams) -> nn.Module`` with ``n_outputs`` (DomainBed's
            ``networks.Featurizer``), called with the input shape DomainBed's algorithm uses; ``None``:
            ``fishr_lightning.domainbed.networks.Featurizer``.
        seed: every random draw of an update depends only on ``(seed, update)``.
    """
    cls = algorithm_class(name)
    try:
        return cls(tuple(input_shape), num_classes, num_domains, dict(hparams), featurizer=featurizer, seed=seed)
    except KeyError as error:
        key = error.args[0] if error.args else None
        if isinstance(key, str) and key not in hparams:
            raise DomainBedError(
                f"{name} reads the hyperparameter {key!r}, which hparams lacks. Pass DomainBed's whole dict: "
                f"fishr_lightning.domainbed.default_hparams({name!r}, dataset) gives it."
            ) from None
        raise
