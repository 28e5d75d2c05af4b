"""RDM (Nguyen et al., WACV 2024, "Domain Generalization via Risk Distribution Matching",
arXiv:2310.18598), DomainBed's ``RDM``: ERM plus, from update ``rdm_penalty_anneal_iters`` on, the match of
the per-sample risks' distributions. With ``ℓ_e`` the vector of domain ``e``'s per-sample cross-entropies,
``L_e`` its mean and ``w = argmax_e L_e`` the worst domain:

    loss = mean_e L_e + rdm_lambda · MMD²(ℓ_w, ℓ_all) + variance_weight · (Var(ℓ_all) + Var(ℓ_w)),

``ℓ_all`` every domain's risks together, MMD² with the sum of Gaussian kernels ``exp(−γ d²)`` for
``γ ∈ {1e-4, …, 1e3}``, ``Var`` unbiased. Both weights are 0 before the anneal; at it Adam is re-created with
the learning rate ``rdm_lr``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.domainbed.algorithm import DomainBedError, Minibatches
from fishr_lightning.domainbed.erm import ERM

# DomainBed's RDM.gaussian_kernel bandwidths (one more, 1e-4, than CausIRL's and MMD's).
RDM_GAMMAS = (0.0001, 0.001, 0.01, 0.1, 1, 10, 100, 1000)


def squared_distances(x1_ND: Tensor, x2_MD: Tensor) -> Tensor:
    """DomainBed's ``my_cdist``: ``‖x1_n − x2_m‖²`` by the expanded product, clamped at 1e-30."""
    x1_norm_N1 = x1_ND.pow(2).sum(dim=-1, keepdim=True)
    x2_norm_M1 = x2_MD.pow(2).sum(dim=-1, keepdim=True)
    distances_NM = torch.addmm(x2_norm_M1.transpose(-2, -1), x1_ND, x2_MD.transpose(-2, -1), alpha=-2)
    return distances_NM.add_(x1_norm_N1).clamp_min_(1e-30)


def gaussian_kernel(x1_ND: Tensor, x2_MD: Tensor) -> Tensor:
    distances_NM = squared_distances(x1_ND, x2_MD)
    kernel_NM = torch.zeros_like(distances_NM)
    for gamma in RDM_GAMMAS:
        kernel_NM.add_(torch.exp(distances_NM.mul(-gamma)))
    return kernel_NM


def rdm_mmd(x_ND: Tensor, y_MD: Tensor) -> Tensor:
    """DomainBed's ``RDM.mmd``: the biased MMD² estimate, ``mean K(x,x) + mean K(y,y) − 2 mean K(x,y)``."""
    return (
        gaussian_kernel(x_ND, x_ND).mean() + gaussian_kernel(y_MD, y_MD).mean() - 2 * gaussian_kernel(x_ND, y_MD).mean()
    )


class RDM(ERM):
    """``update_count`` is a buffer (DomainBed's key); Adam is re-created with ``rdm_lr`` at the anneal."""

    ddp_refusal = (
        "its worst domain and the MMD of the risks' distributions are over every domain's whole minibatch, which a "
        "rank's shard does not hold"
    )
    quirks = (
        "Adam is re-created at the anneal with rdm_lr, RDM's own learning rate: lr only serves the ERM updates before it",
        "rdm_lambda is logged at every update, also before the anneal when its weight is 0",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        hparams, count = self.hparams, int(self.update_count.item())
        annealed = count >= hparams["rdm_penalty_anneal_iters"]
        matching_weight = hparams["rdm_lambda"] if annealed else 0.0
        variance_weight = hparams["variance_weight"] if annealed else 0.0
        sizes = [len(y) for _, y in minibatches]
        if len(set(sizes)) > 1:
            raise DomainBedError(
                f"RDM stacks the domains' per-sample risks into one matrix, so every domain's minibatch must have "
                f"the same size (these have {sizes}); give each training domain the same batch_size, as DomainBed's "
                "loaders do."
            )
        all_logits = self.predict(torch.cat([x for x, _ in minibatches]))
        # DomainBed collects the domains' losses in torch.zeros(E).cuda() (float32, whatever the model's dtype):
        # here they keep the logits' dtype and device, the same numbers in float32 training.
        logits_per_domain = all_logits.split(sizes)
        losses_E = torch.stack([F.cross_entropy(logits, y) for logits, (_, y) in zip(logits_per_domain, minibatches)])
        nll_EN = torch.stack(
            [F.cross_entropy(logits, y, reduction="none") for logits, (_, y) in zip(logits_per_domain, minibatches)]
        )
        erm_loss = losses_E.mean()
        risks_EN = torch.squeeze(nll_EN)  # DomainBed's squeeze (one domain: a vector)
        worst_risks_N = torch.flatten(risks_EN[torch.argmax(losses_E.detach())])
        all_risks = torch.flatten(risks_EN)
        matching_penalty = rdm_mmd(worst_risks_N.unsqueeze(1), all_risks.unsqueeze(1))
        variance_penalty = torch.var(all_risks) + torch.var(worst_risks_N)
        total_loss = erm_loss + matching_weight * matching_penalty + variance_weight * variance_penalty
        if count == hparams["rdm_penalty_anneal_iters"]:  # DomainBed re-creates Adam with its own learning rate
            self.reset_optimizer("optimizer")
            for group in self.optimizer_named("optimizer").param_groups:
                group["lr"] = hparams["rdm_lr"]
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(total_loss)
        self.step("optimizer")
        self.update_count += 1
        return {
            "update_count": float(self.update_count.item()),
            "total_loss": total_loss.item(),
            "erm_loss": erm_loss.item(),
            "matching_penalty": matching_penalty.item(),
            "variance_penalty": variance_penalty.item(),
            "rdm_lambda": hparams["rdm_lambda"],
        }
