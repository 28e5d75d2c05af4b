"""``DomainPenaltyCallback``: what the comparison set's callbacks add to ``HeadPenaltyCallback``.

The number of training domains (given, or the largest id of the fit's first batch plus one, over all
ranks), the cross-rank sum their per-domain statistics go through under DDP, and float32 maths under
mixed precision. Each algorithm is then a short file: its schedule and its formula.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from fishr_lightning import distributed
from fishr_lightning.baselines.functional import SumReduction
from fishr_lightning.functional import FishrInputError
from fishr_lightning.head_penalty import HeadPenaltyCallback


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks, differentiably: its backward sums the gradient over ranks,
    and DDP's average then gives the single-process gradient (``shared/DESIGN.md``, "Under DDP")."""
    return distributed.differentiable_all_reduce_sum(tensor)


def ranks_before(count_E: Tensor) -> Tensor:
    """``[E]``: the samples of each domain held by the ranks before this one (no gradient)."""
    gathered = [torch.zeros_like(count_E) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, count_E.detach().contiguous())
    rank = torch.distributed.get_rank()
    return torch.stack(gathered[:rank]).sum(dim=0) if rank > 0 else torch.zeros_like(count_E)


class DomainPenaltyCallback(HeadPenaltyCallback):
    """A head penalty computed from per-domain statistics (IRM, V-REx, CORAL, MMD, GroupDRO, SD).

    Args:
        num_domains: training domains, ids ``0 .. num_domains-1``. Default ``None``: the largest id
            of the fit's first training batch plus one (under DDP, over all ranks).
        **kwargs: ``HeadPenaltyCallback``'s (``schedule``, ``head``, ``targets_and_domains``, ``name``).
    """

    def __init__(self, *, num_domains: int | None = None, **kwargs: Any) -> None:
        if num_domains is not None and (isinstance(num_domains, bool) or num_domains < 1):
            raise FishrInputError(f"num_domains={num_domains}: the number of training domains, a positive integer.")
        super().__init__(**kwargs)
        self.requested_num_domains = num_domains
        self.num_domains = num_domains
        self.reduce: SumReduction | None = None

    def configure_penalty(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reduce = all_reduce_sum if distributed.is_distributed(trainer.world_size) else None

    def reset_state(self) -> None:
        self.num_domains = self.requested_num_domains

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_domains": self.num_domains}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_domains = state_dict.get("num_domains", self.num_domains)

    def domains_of(self, domains_N: Tensor) -> int:
        """The number of domains, inferred once per fit (the same on every rank) when not given."""
        if self.num_domains is None:
            largest = domains_N.max() if domains_N.numel() else domains_N.new_tensor(-1)
            if self.reduce is not None:
                largest = distributed.all_reduce_max(largest)
            self.num_domains = int(largest) + 1
            if self.num_domains < 1:
                raise FishrInputError(
                    f"{type(self).__name__} found no domain ids in the first batch; pass num_domains=..."
                )
        return self.num_domains

    def compute_penalty(
        self,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets_N: Tensor,
        domains_N: Tensor,
        weight: float,
        trainer: pl.Trainer,
    ) -> Tensor:
        """``domain_penalty`` in float32 outside autocast (under ``16-mixed``/``bf16-mixed`` too)."""
        with torch.autocast(features_ND.device.type, enabled=False):
            return self.domain_penalty(float32(features_ND), float32(logits_NC), targets_N, domains_N)

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        """This step's raw penalty (a scalar); each algorithm's file implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement domain_penalty(...).")


def float32(tensor: Tensor) -> Tensor:
    """Half-precision activations (``16-mixed``, ``bf16-mixed``) in float32 for the penalty's maths."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
