"""Finding the head of a penalty (Fishr's, or a baseline's) in a module and reading targets and domain ids
from a batch (pure torch). ``owner`` names the callback in error messages (issue 25)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from fishr_lightning.functional import FishrInputError

TargetsAndDomains = Callable[[Any], tuple[Tensor, Tensor]]

# Tried in this order when no head is named; DomainBed, torchvision and timm call the head so
# (timm: ``head`` for ViTs, ``fc`` for ResNets, ``head.fc`` for ConvNeXt and other NormMlp heads).
DEFAULT_HEAD_NAMES = ("classifier", "fc", "head", "head.fc", "linear")


def resolve_head(module: nn.Module, head: str | None, owner: str = "Fishr") -> tuple[str, nn.Linear]:
    """The final ``nn.Linear`` at attribute path ``head`` (``"model.fc"``), or the default one.

    With ``head=None``: the ``nn.Linear`` among ``DEFAULT_HEAD_NAMES`` found at the top level or
    under ``model``/``network``, else the module's only ``nn.Linear``; anything else is ambiguous.
    """
    if head is not None:
        try:
            found = module.get_submodule(head)
        except AttributeError:
            linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            raise FishrInputError(
                f"{type(module).__name__} has no submodule {head!r} to use as the {owner} head. "
                f"Its nn.Linear modules are {linears}: pass one of them as head=..."
            ) from None
        if not isinstance(found, nn.Linear):
            raise FishrInputError(
                f"The {owner} head {head!r} is a {type(found).__name__}, not an nn.Linear. {owner}'s penalty is "
                "computed on the final linear layer: point head= at that nn.Linear (for a "
                "non-linear classifier, at its last nn.Linear, with the layers before it as the features)."
            )
        return head, found
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    for prefix in ("", "model.", "network."):
        for name in DEFAULT_HEAD_NAMES:
            if prefix + name in linears:
                return prefix + name, linears[prefix + name]
    if len(linears) == 1:
        return next(iter(linears.items()))
    raise FishrInputError(
        f"Cannot tell which nn.Linear of {type(module).__name__} is the classification head: "
        f"{'it has none' if not linears else 'candidates are ' + str(list(linears))}. "
        "Pass head='attribute.path' of the final nn.Linear (e.g. head='classifier' or head='model.fc')."
    )


def default_targets_and_domains(batch: Any, owner: str = "Fishr") -> tuple[Tensor, Tensor]:
    """``(x, y, domain)`` tuples or mappings with keys ``y`` and ``domain``."""
    if isinstance(batch, Mapping) and "y" in batch and "domain" in batch:
        return batch["y"], batch["domain"]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) == 3:
        return batch[1], batch[2]
    layout = f"a mapping with keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
    raise FishrInputError(
        f"{owner} needs each training sample's target and domain id, but the batch is {layout}. "
        "Yield (x, y, domain) tuples or mappings with keys 'x', 'y', 'domain', or pass "
        "targets_and_domains=lambda batch: (targets, domain_ids)."
    )
