"""EQRM (Eastwood et al., NeurIPS 2022, "Probable domain generalization via quantile risk minimization",
Algorithm 1), DomainBed's ``EQRM``: ERM for ``eqrm_burnin_iters`` updates, then the ``α``-quantile of the
domains' risks under a Gaussian kernel density estimate of them (bandwidth ``1.06 σ̂ n^(−1/5)``), found by 32
bisection steps on the estimate's CDF; Adam re-created at the burn-in's end with the learning rate ``eqrm_lr``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


def kde_quantile(risks_E: Tensor, alpha: Tensor, bisection_steps: int = 32) -> Tensor:
    """The ``alpha``-quantile of the Gaussian KDE of ``risks_E``, differentiable in the risks as DomainBed's
    ``misc.Nonparametric().icdf`` (its bisection's end points ``lo``, ``hi`` carry the gradient). ``alpha < 0``
    stands for ``log(1 − q)`` (a quantile very close to 1), as there."""
    data_E, _ = torch.sort(risks_E)
    bandwidth = 1.06 * torch.std(data_E, unbiased=True) * len(data_E) ** -0.2  # "Gauss-optimal"
    if alpha < 0:
        return torch.mean(data_E + bandwidth * math.sqrt(-2 * float(alpha)))
    bandwidths_E = torch.ones(len(data_E), device=data_E.device, dtype=data_E.dtype) * bandwidth
    low = torch.distributions.Normal(data_E[0], bandwidths_E[0]).icdf(alpha)
    high = torch.distributions.Normal(data_E[-1], bandwidths_E[-1]).icdf(alpha)
    kernels = torch.distributions.Normal(data_E, bandwidths_E)
    bounds = [low, high]
    k = 0.5 * sum(bounds)
    for _ in range(bisection_steps):  # DomainBed's misc.continuous_bisect_fun_left
        bounds[int(kernels.cdf(k).mean() > alpha)] = k
        next_k = 0.5 * sum(bounds)
        if next_k == k:
            break
        k = next_k
    return k


class EQRM(ERM):
    """``update_count`` and ``alpha`` (the quantile, float64) are buffers, as DomainBed's."""

    ddp_refusal = "its quantile is over every domain's risk on its whole minibatch, which a rank's shard does not hold"
    quirks = (
        "alpha is a float64 buffer (DomainBed's); it stays float64 under any trainer.precision",
        "a drawn eqrm_burnin_iters is a float (10**U(2.5, 3.5)), so update_count never equals it and Adam is not "
        "re-created with eqrm_lr, as in DomainBed",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))
        self.register_buffer("alpha", torch.tensor(self.hparams["eqrm_quantile"], dtype=torch.float64))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> EQRM:
        # module.to(dtype) (Lightning's precision plugins) would round the quantile: keep DomainBed's float64.
        alpha = self.alpha
        super()._apply(fn, *args, **kwargs)
        self.alpha = alpha.to(device=self.alpha.device, dtype=torch.float64)
        return self

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        risks_E = torch.cat([F.cross_entropy(self.network(x), y).reshape(1) for x, y in minibatches])
        count = int(self.update_count.item())
        if count < self.hparams["eqrm_burnin_iters"]:
            loss = risks_E.mean()  # burn-in: ERM, as penalty methods' warm-up
        else:
            loss = kde_quantile(risks_E, self.alpha.to(risks_E.dtype))
        if count == self.hparams["eqrm_burnin_iters"]:  # Adam re-created with DomainBed's eqrm_lr
            self.reset_optimizer("optimizer")
            for group in self.optimizer_named("optimizer").param_groups:
                group["lr"] = self.hparams["eqrm_lr"]
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        self.update_count += 1
        return {"loss": loss.item()}
