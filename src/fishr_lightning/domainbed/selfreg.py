"""Self-supervised contrastive regularisation, DomainBed's ``SelfReg`` (issue 26).

Kim et al., *SelfReg: Self-supervised Contrastive Regularization for Domain Generalization*, ICCV 2021. The
batch sorted by class, each sample is paired with two others of its class (two random permutations ``π₁, π₂``
within each class), mixed with ``λ ~ Beta(0.5, 0.5)``; with ``z`` the features, ``p = cdpl(z)`` their
projection, ``o`` the logits:

    o₂ = o_π₁,  p₂ = p_π₁,  o₃ = λ o_π₁ + (1−λ) o_π₂,  p₃ = λ p_π₁ + (1−λ) p_π₂
    L = CE(o, y) + min(CE, 1) · [λ (MSE(o, o₂) + 0.3 MSE(z, p₂)) + (1−λ) (MSE(o, o₃) + 0.3 MSE(z, p₃))]

``min(CE, 1)`` a constant (DomainBed's ``C_scale = min(cl_loss.item(), 1.)``), one Adam on ERM's network.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


class SelfReg(ERM):
    """DomainBed's ``SelfReg``: ERM's networks and optimizer plus ``cdpl``, the class-discriminative projection
    (three linear layers with BatchNorm, hidden width ``n_outputs`` when it is 2048, else ``2 · n_outputs``)."""

    ddp_refusal = (
        "it pairs each sample with others of its class drawn from every domain's whole minibatch, which one "
        "process's shard does not hold"
    )
    quirks: ClassVar[tuple[str, ...]] = (
        "cdpl is in no optimizer (ERM's Adam is built before it): its weights keep their initial values and only "
        "its BatchNorm statistics move.",
        "The feature terms compare the featurizer's output z with the other samples' projections cdpl(z) "
        "(0.3 · MSE(z, p₂)), not projections with projections.",
        "The batch is sorted by class with torch.sort (not stable), and the class groups start where the sorted "
        "label changes from the previous one, the first compared with 0.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.MSEloss = nn.MSELoss()  # noqa: N815 (DomainBed's name)
        input_feat_size = self.featurizer.n_outputs
        hidden_size = input_feat_size if input_feat_size == 2048 else input_feat_size * 2
        self.cdpl = nn.Sequential(
            nn.Linear(input_feat_size, hidden_size),
            nn.BatchNorm1d(hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, hidden_size),
            nn.BatchNorm1d(hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, input_feat_size),
            nn.BatchNorm1d(input_feat_size),
        )

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        lam = float(self.random_state("selfreg").beta(0.5, 0.5))  # DomainBed's np.random.beta(0.5, 0.5)
        batch_size = all_y.size()[0]

        # cluster and order the samples into same-class groups: [start, end) per class, as DomainBed's loop
        with torch.no_grad():
            sorted_y, indices = torch.sort(all_y)
            intervals, previous = [], 0
            for position, label in enumerate(sorted_y.tolist()):
                if label != previous:
                    intervals.append(position)
                    previous = label
            intervals.append(batch_size)
            all_x, all_y = all_x[indices], sorted_y

        feat = self.featurizer(all_x)
        proj = self.cdpl(feat)
        output = self.classifier(feat)

        # two random permutations within each class group, drawn in DomainBed's order (the group's first, second)
        generator = self.generator("selfreg")
        shuffle_1, shuffle_2, start = [], [], 0
        for end in intervals:
            shuffle_1.append(torch.randperm(end - start, generator=generator) + start)
            shuffle_2.append(torch.randperm(end - start, generator=generator) + start)
            start = end
        shuffle_1, shuffle_2 = torch.cat(shuffle_1).to(output.device), torch.cat(shuffle_2).to(output.device)
        output_2, feat_2 = output[shuffle_1], proj[shuffle_1]
        output_3, feat_3 = output[shuffle_2], proj[shuffle_2]

        # mixup
        output_3 = lam * output_2 + (1 - lam) * output_3
        feat_3 = lam * feat_2 + (1 - lam) * feat_3

        # regularization
        L_ind_logit = self.MSEloss(output, output_2)  # noqa: N806 (the paper's and DomainBed's names)
        L_hdl_logit = self.MSEloss(output, output_3)  # noqa: N806
        L_ind_feat = 0.3 * self.MSEloss(feat, feat_2)  # noqa: N806
        L_hdl_feat = 0.3 * self.MSEloss(feat, feat_3)  # noqa: N806

        cl_loss = F.cross_entropy(output, all_y)
        C_scale = min(cl_loss.item(), 1.0)  # noqa: N806
        loss = cl_loss + C_scale * (lam * (L_ind_logit + L_ind_feat) + (1 - lam) * (L_hdl_logit + L_hdl_feat))

        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        return {"loss": loss.item()}
