"""``DomainPenaltyCallback``: what the comparison set's callbacks add to ``HeadPenaltyCallback``.

The number of training domains (given, or the largest id of the fit's first batch plus one, over all
ranks) and Fishr's checks of the domain ids against it, the cross-rank sum their per-domain statistics
go through under DDP, and float32 maths under mixed precision. Each algorithm is then a short file: its
schedule and its formula.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from fishr_lightning import distributed
from fishr_lightning import functional as FF
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

    Domain ids are checked as ``FishrCallback`` checks them (issue 25): integers in ``0 .. E-1`` at every
    step, so a domain id the first batch lacked (``num_domains`` inferred too small) is an error, never
    a domain silently left out of every later penalty; under DDP every rank stops alike.

    Args:
        num_domains: training domains, ids ``0 .. num_domains-1``. Default ``None``: the largest id
            of the fit's first training batch plus one (under DDP, over all ranks).
        **kwargs: ``HeadPenaltyCallback``'s (``schedule``, ``head``, ``targets_and_domains``, ``name``).
    """

    # Whether the penalty reads the batch's domain ids (SD's does not).
    uses_domain_ids: bool = True
    # Whether ``domain_penalty`` takes class targets ``[N]`` and ``C >= 2`` logits through DomainBed's
    # cross-entropy (IRM, V-REx, GroupDRO): a one-logit BCE head is refused with a clear message.
    needs_class_logits: bool = False

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
        saved = state_dict.get("num_domains")
        if saved is not None and self.requested_num_domains is not None and saved != self.requested_num_domains:
            raise FishrInputError(
                f"The checkpoint's {type(self).__name__} state is for {saved} training domains, but num_domains="
                f"{self.requested_num_domains} was given: resume with the same training domains (or start afresh)."
            )
        self.num_domains = saved if saved is not None else self.num_domains

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.accumulate_grad_batches > 1:  # as FishrCallback warns (issue 25)
            rank_zero_warn(
                f"{type(self).__name__} with accumulate_grad_batches={trainer.accumulate_grad_batches}: each "
                "micro-batch gets its own penalty, over its own samples only"
                f"{self._accumulation_note()}. DomainBed computes one penalty per step over the whole batch: to "
                "match it, fit the whole batch at once (or spread it over devices under DDP, whose per-domain "
                "statistics are summed over ranks).",
                category=UserWarning,
            )

    def _accumulation_note(self) -> str:
        """What else advances once per micro-batch under gradient accumulation (GroupDRO's ``q``)."""
        return ""

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

    def check_domain_ids(self, domains_N: Tensor) -> int:
        """``E``, after Fishr's checks of the ids: integers, all in ``[0, E)`` (over all ranks under DDP)."""
        FF.domain_indicator(domains_N, 1, torch.float32)  # refuses ids that are not integers
        E = self.domains_of(domains_N)
        outside = ((domains_N < 0) | (domains_N >= E)).sum()
        if self.reduce is not None:  # an id out of range on one rank stops every rank, not only that one
            outside = distributed.all_reduce_max(outside)
        if int(outside):
            FF.check_domain_ids(domains_N, E, owner=type(self).__name__)  # names the id, on the rank that holds it
            raise FishrInputError(
                f"{type(self).__name__}: sample(s) of the global batch have a domain id outside [0, {E}) on another "
                "process. Domain ids must index the training domains 0 .. num_domains-1: re-number them or pass "
                "the right num_domains."
            )
        return E

    def check_class_logits(self, logits_NC: Tensor, targets_N: Tensor) -> None:
        """DomainBed's cross-entropy needs ``C >= 2`` logits and integer class targets ``[N]``."""
        if logits_NC.shape[1] < 2 or targets_N.dim() != 1 or targets_N.dtype.is_floating_point:
            raise FishrInputError(
                f"{type(self).__name__} computes DomainBed's cross-entropy over the head's logits, which needs "
                f"C >= 2 logits and integer class targets [N]; the head gives logits of shape "
                f"{tuple(logits_NC.shape)} and the targets have shape {tuple(targets_N.shape)}, dtype "
                f"{targets_N.dtype}. A one-logit BCE head is not supported: use a two-logit head (nn.Linear(D, 2)) "
                "trained with cross-entropy on class ids 0/1."
            )

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
        if self.uses_domain_ids:
            self.check_domain_ids(domains_N)
        if self.needs_class_logits:
            self.check_class_logits(logits_NC, targets_N)
        with torch.autocast(features_ND.device.type, enabled=False):
            return self.domain_penalty(float32(features_ND), float32(logits_NC), targets_N, domains_N)

    def domain_penalty(self, features_ND: Tensor, logits_NC: Tensor, targets_N: Tensor, domains_N: Tensor) -> Tensor:
        """This step's raw penalty (a scalar); each algorithm's file implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement domain_penalty(...).")


def float32(tensor: Tensor) -> Tensor:
    """Half-precision activations (``16-mixed``, ``bf16-mixed``) in float32 for the penalty's maths."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
