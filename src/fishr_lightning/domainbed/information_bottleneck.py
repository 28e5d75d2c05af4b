"""IB-ERM and IB-IRM (Ahuja et al., NeurIPS 2021, "Invariance principle meets information bottleneck"),
DomainBed's ``IB_ERM`` / ``IB_IRM``: ERM (or IRM) plus the information-bottleneck penalty, the mean over
domains of the mean feature variance ``mean_d Var_i[z_id]``, weighted by ``ib_lambda`` from update
``ib_penalty_anneal_iters`` on (0 before), Adam re-created when a penalty switches on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fishr_lightning.baselines.functional import irm_penalty
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


class IB_ERM(ERM):  # noqa: N801 (DomainBed's name)
    """ERM + ``ib_lambda · mean_e mean_d Var_i[z]`` (DomainBed's ``IB_ERM``; ``update_count`` buffer)."""

    irm = False
    ddp_refusal = "its feature variances are each domain's whole minibatch's, which a rank's shard does not hold"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        hparams, count = self.hparams, int(self.update_count.item())
        ib_weight = hparams["ib_lambda"] if count >= hparams["ib_penalty_anneal_iters"] else 0.0
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        features = self.featurizer(all_x)
        logits = self.classifier(features)
        sizes = [len(y) for _, y in minibatches]
        nll = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits.split(sizes), minibatches)]).mean()
        ib_penalty = torch.stack([z.var(dim=0).mean() for z in features.split(sizes)]).mean()
        loss = nll + ib_weight * ib_penalty
        values = {"nll": nll, "IB_penalty": ib_penalty}
        anneal = [hparams["ib_penalty_anneal_iters"]]
        if self.irm:
            irm_weight = hparams["irm_lambda"] if count >= hparams["irm_penalty_anneal_iters"] else 1.0
            domains = torch.cat([torch.full((n,), e, device=all_y.device) for e, n in enumerate(sizes)])
            penalty = irm_penalty(logits, all_y, domains, len(minibatches))
            loss = loss + irm_weight * penalty
            values["IRM_penalty"] = penalty
            anneal.append(hparams["irm_penalty_anneal_iters"])
        if count in anneal:  # DomainBed re-creates Adam: "it doesn't like the sharp jump in gradient magnitudes"
            self.reset_optimizer("optimizer")
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        self.update_count += 1
        return {"loss": loss.item(), **{name: float(value.item()) for name, value in values.items()}}


class IB_IRM(IB_ERM):  # noqa: N801 (DomainBed's name)
    """IRM (its penalty weight 1 before ``irm_penalty_anneal_iters``) + the information bottleneck."""

    irm = True
