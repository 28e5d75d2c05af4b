"""DomainBed's ``minibatches`` (``[(x_e, y_e)]``, one per training domain) as the concatenated batch and the
domain id of each row: the form the maths of ``fishr_lightning.functional`` and ``baselines.functional``
take (issue 26)."""

from __future__ import annotations

import torch
from torch import Tensor

from fishr_lightning.domainbed.algorithm import Minibatches


def concatenate(minibatches: Minibatches) -> tuple[Tensor, Tensor, Tensor]:
    """``(all_x, all_y, domain_N)``: DomainBed's ``torch.cat`` of the minibatches, and minibatch ``e``'s
    rows labelled ``e`` (``0 .. len(minibatches) − 1``)."""
    all_x = torch.cat([x for x, _ in minibatches])
    all_y = torch.cat([y for _, y in minibatches])
    sizes = torch.tensor([len(y) for _, y in minibatches], device=all_y.device)
    domain_N = torch.arange(len(minibatches), device=all_y.device).repeat_interleave(sizes)
    return all_x, all_y, domain_N
