"""Cross-rank reductions for data-parallel Fishr (pure torch, ``torch.distributed``).

Per-domain moments are sums, so ranks add theirs (differentiably) and every rank then holds the
global batch's variances (DESIGN.md, "Under DDP"). Everything a check depends on (counts, samples
with ids out of range, the inferred number of domains) is reduced too, so every rank takes the same
decision and none raises while the others wait in a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fishr_lightning.functional import HeadGradientMoments

MomentsReduction = Callable[[HeadGradientMoments], HeadGradientMoments]
MaxReduction = Callable[[Tensor], Tensor]


def all_reduce_moments(moments: HeadGradientMoments) -> HeadGradientMoments:
    """Sum the per-domain moments (and the sample count) over all ranks, differentiably, in one collective.

    The collective's backward sums the gradient over ranks and DDP averages it, which together
    give the single-process gradient.
    """
    grad_sum_EP, grad_sq_sum_EP, count_E = moments.as_tuple()
    E, P = grad_sum_EP.shape
    num_samples = moments.num_samples if moments.num_samples is not None else count_E.sum()
    parts = [grad_sum_EP.reshape(-1), grad_sq_sum_EP.reshape(-1), count_E.to(grad_sum_EP.dtype)]
    flat = torch.cat(parts + [num_samples.to(grad_sum_EP.dtype).reshape(1)])
    flat = _DifferentiableSum.apply(flat)
    return HeadGradientMoments(
        flat[: E * P].view(E, P), flat[E * P : 2 * E * P].view(E, P), flat[2 * E * P : -1], num_samples=flat[-1]
    )


class _DifferentiableSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with a backward that sums the gradients over ranks too (each rank's input
    reaches every rank's output). ``torch.distributed.nn.functional.all_reduce`` did this and now
    warns at each call that it is deprecated (torch 2.14) in favour of the private
    ``torch.distributed._functional_collectives.all_reduce``; a plain collective in an
    ``autograd.Function`` works on every torch this package supports (issue 19)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad


class _DifferentiableGather(torch.autograd.Function):
    """``all_gather`` of equal-sized tensors, concatenated in rank order, with the backward of a gather:
    the gradients of every rank's output summed, this rank's rows returned."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = torch.distributed.get_rank(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def differentiable_all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks; its backward sums the gradient over ranks too."""
    return _DifferentiableSum.apply(tensor)


def differentiable_all_gather(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (same shape on every rank) concatenated in rank order, differentiably."""
    return _DifferentiableGather.apply(tensor)


def all_reduce_max(value: Tensor) -> Tensor:
    """The maximum of ``value`` over all ranks (no gradient)."""
    value = value.detach().clone()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value


def is_distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def distributed_reduction(world_size: int) -> MomentsReduction | None:
    """``all_reduce_moments`` when running on several initialised ranks, else ``None``."""
    return all_reduce_moments if is_distributed(world_size) else None


def distributed_max(world_size: int) -> MaxReduction | None:
    """``all_reduce_max`` when running on several initialised ranks, else ``None``."""
    return all_reduce_max if is_distributed(world_size) else None
