"""Feature alignment between training domains, DomainBed's ``AbstractMMD`` and its two kernels: ERM's network
and Adam, the objective ``mean_e CE_e + mmd_gamma · Σ_{i<j} d(z_i, z_j) / (E(E−1)/2)`` over the features
``z_e`` of each domain's minibatch (one featurizer forward per domain).

- ``MMD`` (Li et al., "Domain Generalization with Adversarial Feature Learning", CVPR 2018): ``d`` the biased
  MMD² of a mixture of Gaussian kernels (``baselines.functional.mmd_penalty``);
- ``CORAL`` (Sun & Saenko, "Deep CORAL", ECCV 2016 workshops): ``d = mean((μ_i − μ_j)²) + mean((Σ_i − Σ_j)²)``
  with unbiased covariances (``baselines.functional.coral_penalty``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fishr_lightning.baselines.functional import coral_penalty, mmd_penalty
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM
from fishr_lightning.domainbed.minibatches import concatenate


class AbstractMMD(ERM):
    """ERM's networks and ``optimizer``; ``gaussian`` picks the kernel (DomainBed's ``kernel_type``)."""

    gaussian = True
    quirks = (
        "one featurizer forward per domain (each normalised by its own BatchNorm statistics)",
        "the penalty is 0 with one training domain (ERM)",
        "the logged loss is the cross-entropy alone, without the penalty",
    )

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        objective = sum(F.cross_entropy(self.classifier(z), y) for z, (_, y) in zip(features, minibatches))
        objective = objective / len(minibatches)
        _, _, domain_N = concatenate(minibatches)
        penalty_of = mmd_penalty if self.gaussian else coral_penalty
        penalty = penalty_of(torch.cat(features), domain_N, len(minibatches))
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(objective + self.hparams["mmd_gamma"] * penalty)
        self.step("optimizer")
        return {"loss": objective.item(), "penalty": penalty.item()}


class MMD(AbstractMMD):
    """MMD with DomainBed's Gaussian kernel mixture (``γ ∈ {10⁻³ … 10³}``)."""

    gaussian = True
    ddp_refusal = "its kernel runs over pairs of samples of each domain's whole minibatch"
    quirks = (*AbstractMMD.quirks, "the biased MMD² estimator (each domain's kernel diagonal included)")


class CORAL(AbstractMMD):
    """CORAL: the domains' feature means and covariances matched (DomainBed's ``mean_cov`` kernel)."""

    gaussian = False
    ddp_refusal = "its penalty compares the feature moments of each domain's whole minibatch"
    quirks = (*AbstractMMD.quirks, "unbiased covariances (n − 1), differences averaged (not summed) over entries")
