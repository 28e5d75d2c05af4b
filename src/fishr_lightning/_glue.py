"""What ``FishrCallback`` and ``FishrMixin`` share: finding the head, reading batches, the
cross-rank reduction, the warm-up schedule, and the optimizer reset."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fishr_lightning.functional import FishrInputError, HeadGradientMoments, penalty_weight_at_step
from fishr_lightning.penalty import FishrPenalty

TargetsAndDomains = Callable[[Any], "tuple[Tensor, Tensor]"]

# Tried in this order when no head is named; DomainBed, torchvision and timm call the head so
# (timm: ``head`` for ViTs, ``fc`` for ResNets, ``head.fc`` for ConvNeXt and other NormMlp heads).
DEFAULT_HEAD_NAMES = ("classifier", "fc", "head", "head.fc", "linear")


def resolve_head(module: nn.Module, head: str | None) -> tuple[str, nn.Linear]:
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
                f"{type(module).__name__} has no submodule {head!r} to use as the Fishr head. "
                f"Its nn.Linear modules are {linears}: pass one of them as head=..."
            ) from None
        if not isinstance(found, nn.Linear):
            raise FishrInputError(
                f"The Fishr head {head!r} is a {type(found).__name__}, not an nn.Linear. Fishr regularises the "
                "per-sample gradients of the final linear layer: point head= at that nn.Linear (for a "
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


def default_targets_and_domains(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y, domain)`` tuples or mappings with keys ``y`` and ``domain``."""
    if isinstance(batch, Mapping) and "y" in batch and "domain" in batch:
        return batch["y"], batch["domain"]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) == 3:
        return batch[1], batch[2]
    layout = f"a mapping with keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
    raise FishrInputError(
        f"Fishr needs each training sample's target and domain id, but the batch is {layout}. "
        "Yield (x, y, domain) tuples or mappings with keys 'x', 'y', 'domain', or pass "
        "targets_and_domains=lambda batch: (targets, domain_ids)."
    )


def all_reduce_moments(moments: HeadGradientMoments) -> HeadGradientMoments:
    """Sum the per-domain moments over all ranks, differentiably, in one collective.

    Each rank then holds the global batch's variances; the collective's backward sums the
    gradient over ranks and DDP averages it, which together give the single-process gradient
    (DESIGN.md, "Under DDP").
    """
    from torch.distributed.nn.functional import all_reduce

    grad_sum_EP, grad_sq_sum_EP, count_E = moments.as_tuple()
    E, P = grad_sum_EP.shape
    flat = torch.cat([grad_sum_EP.reshape(-1), grad_sq_sum_EP.reshape(-1), count_E.to(grad_sum_EP.dtype)])
    flat = all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    return HeadGradientMoments(flat[: E * P].view(E, P), flat[E * P : 2 * E * P].view(E, P), flat[2 * E * P :])


def reset_optimizer_states(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Forget the optimizers' running statistics, as DomainBed's re-creation of Adam does when the
    penalty switches on ("Adam may not like the sharp jump in gradient magnitudes")."""
    for optimizer in optimizers:
        optimizer.state.clear()


class FishrSchedule:
    """λ_t from the optimizer step, and the optimizer reset at the warm-up step (once)."""

    def __init__(self, penalty_weight: float, warmup_steps: int, ramp_steps: int, reset_optimizer: bool) -> None:
        if penalty_weight < 0 or warmup_steps < 0 or ramp_steps < 0:
            raise FishrInputError(
                f"penalty_weight, warmup_steps and penalty_ramp_steps must be >= 0, got "
                f"{penalty_weight}, {warmup_steps}, {ramp_steps}."
            )
        self.penalty_weight = penalty_weight
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.reset_optimizer = reset_optimizer
        self.last_reset_step: int | None = None

    def weight(self, step: int) -> float:
        return penalty_weight_at_step(step, self.penalty_weight, self.warmup_steps, self.ramp_steps)

    def maybe_reset(self, step: int, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Reset at the first batch of step ``warmup_steps`` (> 0); later micro-batches of the same
        step (gradient accumulation) and restarts do not reset again."""
        due = self.reset_optimizer and self.warmup_steps > 0 and step == self.warmup_steps
        if due and self.last_reset_step != step:
            reset_optimizer_states(optimizers)
            self.last_reset_step = step
            return True
        return False


def compute_penalty(
    penalty: FishrPenalty,
    weight: float,
    features_ND: Tensor,
    logits_NC: Tensor,
    targets: Tensor,
    domains_N: Tensor,
    head: nn.Linear,
) -> Tensor:
    """The penalty, with its graph only when ``weight > 0``.

    During warm-up DomainBed adds ``0 · P``: the EMA still moves but no gradient flows, so the
    closed form runs without a graph there (same numbers, no double-backward).
    """
    if weight > 0 or penalty.backend == "backpack":
        value = penalty(features_ND, logits_NC, targets, domains_N, head=head)
        return value if weight > 0 else value.detach()
    with torch.no_grad():
        return penalty(features_ND.detach(), logits_NC.detach(), targets, domains_N, head=head)


def distributed_reduction(world_size: int) -> Callable[[HeadGradientMoments], HeadGradientMoments] | None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return all_reduce_moments
    return None
