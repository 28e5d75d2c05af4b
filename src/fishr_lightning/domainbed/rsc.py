"""RSC (Huang, Wang, Xing & Huang, *Self-Challenging Improves Cross-Domain Generalization*, ECCV 2020), as
DomainBed's ``RSC``: mute the features the true-class logit depends on most, on the samples whose
confidence that muting lowers most, and train on what is left.

With features ``f = featurizer(x)``, logits ``p = classifier(f)`` and one-hot labels ``o``:

1. ``g = ∂(Σ p·o)/∂f`` (the true-class logit's gradient with respect to each sample's features);
2. ``mask_f[i, d] = g[i, d] < q_i``, ``q_i`` the ``(1 − rsc_f_drop_factor)·100``-th percentile of ``g[i, :]``;
3. ``c_i = softmax(p_i)·o_i − softmax(classifier(f_i·mask_f_i))·o_i`` (the confidence the muting costs);
4. ``mask_b[i] = c_i < q_b``, ``q_b`` the ``(1 − rsc_b_drop_factor)·100``-th percentile of ``c`` over the batch;
5. loss ``CE(classifier(f · (mask_f ∨ mask_b)), y)``, one Adam step (featurizer and classifier).

The percentiles are NumPy's (linear interpolation), as DomainBed computes them; the update draws no random
numbers (the "random" feature drop of RSC's paper is DomainBed's deterministic top percentile).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, autograd

from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


def _numpy_ready(values: Tensor) -> Tensor:
    """A detached CPU tensor NumPy reads (half precisions widened to float32: NumPy has no bfloat16)."""
    values = values.detach()
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    return values.cpu()


class RSC(ERM):
    """DomainBed's ``RSC``: ERM's networks and Adam (same keys), the self-challenging update."""

    ddp_refusal = (
        "its batch mask keeps the samples below a percentile of the whole batch's confidence drops, which a "
        "rank's shard of the batch does not give"
    )
    quirks = (
        "each sample's feature percentile goes through torch.Tensor(...): it is rounded to float32 before the "
        "comparison, whatever the training precision",
        "a feature is kept where its gradient is below its sample's percentile OR its sample's confidence drop is "
        "below the batch's percentile (DomainBed's logical_or of the two masks)",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_f = (1 - self.hparams["rsc_f_drop_factor"]) * 100
        self.drop_b = (1 - self.hparams["rsc_b_drop_factor"]) * 100

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        all_o = F.one_hot(all_y, self.num_classes)
        all_f = self.featurizer(all_x)
        all_p = self.classifier(all_f)

        # Equation (1): the true-class logit's gradient with respect to the features.
        all_g = autograd.grad((all_p * all_o).sum(), all_f)[0]

        # Equation (2): each sample's top-gradient-percentile mask. DomainBed's torch.Tensor(percentiles) is a
        # float32 tensor (its default dtype): the percentiles are rounded to float32, kept here (a quirk).
        percentiles = np.percentile(_numpy_ready(all_g), self.drop_f, axis=1)
        percentiles = torch.tensor(percentiles, dtype=torch.float32)
        percentiles = percentiles.unsqueeze(1).repeat(1, all_g.size(1))
        mask_f = all_g.lt(percentiles.to(all_g.device)).float()

        # Equations (3)-(4): the predictions with the top-gradient features muted.
        all_p_muted = self.classifier(all_f * mask_f)

        # Section 3.3: the batch percentage, the samples whose true-class confidence the muting lowers most.
        all_s = F.softmax(all_p, dim=1)
        all_s_muted = F.softmax(all_p_muted, dim=1)
        changes = (all_s * all_o).sum(1) - (all_s_muted * all_o).sum(1)
        percentile = np.percentile(_numpy_ready(changes), self.drop_b)
        mask_b = changes.lt(percentile).float().view(-1, 1)
        mask = torch.logical_or(mask_f, mask_b).float()

        # Equations (3)-(5) again, muting over samples, and the update.
        all_p_muted_again = self.classifier(all_f * mask)
        loss = F.cross_entropy(all_p_muted_again, all_y)
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        return {"loss": loss.item()}
