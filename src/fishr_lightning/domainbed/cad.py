"""CAD and CondCAD (Ruan, Dubois & Maddison, ICLR 2022, "Optimal representations for covariate shift"),
DomainBed's ``CAD`` / ``CondCAD``: the cross-entropy plus ``lmbda ·`` a contrastive domain bottleneck on the
features (SupCon's loss, Khosla et al. 2020, turned on the domains): CAD lowers ``I(D; Z)``, CondCAD
``I(D; Z | Y)``. With ``is_flipped`` (the registry's), it maximises the log-probability of the samples from other
domains (with the same label for CondCAD) rather than minimising that of the same domain."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import Classifier, adam

BASE_TEMPERATURE = 0.07  # DomainBed's (SupCon's)


def finite_mean(values_N: Tensor) -> Tensor:
    """The mean of the finite entries, 0 when there is none (DomainBed's ``finite_mean``)."""
    finite_N = torch.isfinite(values_N)
    total = torch.where(finite_N, values_N, torch.zeros_like(values_N)).sum()
    count = finite_N.to(values_N.dtype).sum()
    return total / count if count != 0 else torch.zeros((), dtype=values_N.dtype, device=values_N.device)


def bottleneck_loss(
    z_ND: Tensor, y_N: Tensor, domain_N: Tensor, temperature: float, conditional: bool, flipped: bool
) -> Tensor:
    """DomainBed's ``AbstractCAD.bn_loss`` (its ``is_project`` and ``is_normalized`` applied by the caller)."""
    N = len(z_ND)
    same_label_NN = y_N[:, None] == y_N[None, :]
    same_domain_NN = domain_N[:, None] == domain_N[None, :]
    not_self_NN = ~torch.eye(N, dtype=torch.bool, device=z_ND.device)
    same_label_NN = same_label_NN & not_self_NN
    label_other_domain_NN = same_label_NN & ~same_domain_NN
    label_same_domain_NN = same_label_NN & same_domain_NN
    dtype = z_ND.dtype
    logits_NN = (z_ND @ z_ND.T) / temperature * not_self_NN.to(dtype)
    logits_NN = logits_NN - logits_NN.max(dim=1, keepdim=True).values.detach()  # numerical stability
    scale = temperature / BASE_TEMPERATURE
    if not conditional:
        log_prob_NN = logits_NN - torch.logsumexp(logits_NN + not_self_NN.to(dtype).log(), dim=1, keepdim=True)
        valid_N = same_label_NN.to(dtype).sum(1) > 0
        log_prob_NN, same_domain_NN = log_prob_NN[valid_N], same_domain_NN[valid_N]
        if flipped:  # maximise the log-probability of the samples from other domains
            loss_N = -scale * torch.logsumexp(log_prob_NN + (~same_domain_NN).to(dtype).log(), dim=1)
        else:  # minimise that of the same domain
            loss_N = scale * torch.logsumexp(log_prob_NN + same_domain_NN.to(dtype).log(), dim=1)
    else:
        valid_N = (label_other_domain_NN if flipped else label_same_domain_NN).to(dtype).sum(1) > 0
        same_label_NN, logits_NN = same_label_NN[valid_N].to(dtype), logits_NN[valid_N]
        label_other_domain_NN = label_other_domain_NN[valid_N].to(dtype)
        label_same_domain_NN = label_same_domain_NN[valid_N].to(dtype)
        log_prob_y_NN = logits_NN - torch.logsumexp(logits_NN + same_label_NN.log(), dim=1, keepdim=True)
        if flipped:  # maximise the log-probability of the same label's samples from other domains
            loss_N = -scale * torch.logsumexp(log_prob_y_NN + label_other_domain_NN.log(), dim=1)
        else:
            loss_N = scale * torch.logsumexp(log_prob_y_NN + label_same_domain_NN.log(), dim=1)
    return finite_mean(loss_N)


class AbstractCAD(DomainBedAlgorithm):
    """``featurizer``, ``classifier`` (no ``network``: DomainBed's keys), ``project`` with ``is_project``, Adam."""

    conditional: ClassVar[bool]
    ddp_refusal = "its contrastive loss pairs every sample with the whole batch, which a rank's shard does not hold"
    quirks = (
        "is_project=True raises a NameError in DomainBed (feature_dim is undefined there); here the projection "
        "head is sized by the featurizer's n_outputs",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.featurizer = self.make_featurizer()
        self.classifier = Classifier(self.featurizer.n_outputs, self.num_classes, self.hparams["nonlinear_classifier"])
        if self.hparams["is_project"]:
            width = self.featurizer.n_outputs
            self.project = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 128))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        parameters = [*self.featurizer.parameters(), *self.classifier.parameters()]
        if self.hparams["is_project"]:
            parameters += list(self.project.parameters())
        return {"optimizer": adam(parameters, self.hparams)}

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        all_d = torch.cat(
            [torch.full((len(x),), i, dtype=torch.int64, device=x.device) for i, (x, _) in enumerate(minibatches)]
        )
        all_z = self.featurizer(all_x)
        z = self.project(all_z) if self.hparams["is_project"] else all_z
        if self.hparams["is_normalized"]:
            z = F.normalize(z, dim=1)
        bn_loss = bottleneck_loss(
            z, all_y, all_d, self.hparams["temperature"], self.conditional, self.hparams["is_flipped"]
        )
        clf_loss = F.cross_entropy(self.classifier(all_z), all_y)
        total_loss = clf_loss + self.hparams["lmbda"] * bn_loss
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(total_loss)
        self.step("optimizer")
        return {"clf_loss": clf_loss.item(), "bn_loss": bn_loss.item(), "total_loss": total_loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))


class CAD(AbstractCAD):
    """``I(D; Z)``: needs the domains, not the labels, in its bottleneck."""

    conditional = False


class CondCAD(AbstractCAD):
    """``I(D; Z | Y)``: the domains and the labels."""

    conditional = True
