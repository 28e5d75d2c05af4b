"""TRM (Xu & Jaakkola, 2021, "Learning representations that support robust transfer of predictors",
arXiv:2110.09940), DomainBed's ``TRM``: ERM for ``iters`` updates, then the transfer risk. Each domain ``Q`` has
its own linear classifier ``w_Q`` (``clist``), fitted on the detached features by 30 SGD steps (lr 0.1) per
update; the featurizer and the shared classifier then minimise

    CE(h(f(x)), y) + 1/E Σ_Q [ Σ_{P≠Q} α_QP L_P(w_Q) − cos_lambda · ĝ_P(w_Q) · ∇_w L_Q(w_Q) ],

with ``ĝ_P`` the gradient ``∇_w Σ_P α_QP L_P(w_Q)`` times an inverse-Hessian estimate of ``L_Q`` (DomainBed's
``neum``: up to 10 terms of the Neumann series ``Σ (I − H_Q)^k``, as DomainBed computes it), and
``α_Q·`` GroupDRO's weights over the other domains (renormalised each update, multiplied by
``exp(groupdro_eta · L_P)``). Adam on the featurizer (``optimizer_f``) and on the classifier (``optimizer_c``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import adam

# DomainBed's TRM: 30 SGD steps (lr 0.1) of the per-domain classifiers per update, 10 Neumann terms at most.
INNER_STEPS, INNER_LR, NEUMANN_TERMS, NEUMANN_BOUND = 30, 1e-1, 10, 10


def neumann_inverse_hvp(v: Tensor, model: nn.Linear, batch: tuple[Tensor, Tensor]) -> Tensor:
    """DomainBed's ``TRM.neum``, op for op: ``v`` times the inverse Hessian of ``model``'s cross-entropy on
    ``batch`` in its weight, by the Neumann series, stopped when an entry of the estimate exceeds 10. As in
    DomainBed, the series' first term is aliased to the second (``h_estimate = v`` then ``v -= hv`` in place):
    the estimate is ``2 v₁ + v₂ + … + v_k`` with ``v_k = (I − H)^k v``. ``model.weight.grad`` must exist (it
    is zeroed, as DomainBed does)."""

    def hvp(y: Tensor, w: Tensor, v: Tensor) -> Tensor:
        first_grads = autograd.grad(y, w, retain_graph=True, create_graph=True, allow_unused=True)
        first_grads = nn.utils.parameters_to_vector(first_grads)
        return nn.utils.parameters_to_vector(autograd.grad(first_grads @ v, w, create_graph=True))

    v = v.detach()
    h_estimate = v
    model.eval()
    for _ in range(NEUMANN_TERMS):
        model.weight.grad *= 0
        loss = F.cross_entropy(model(batch[0].detach()), batch[1].detach())
        hv = hvp(loss, model.weight, v)
        v -= hv
        v = v.detach()
        h_estimate = (v + h_estimate).detach()
        if torch.max(abs(h_estimate)) > NEUMANN_BOUND:  # not converging
            break
    model.train()
    return h_estimate.detach()


class TRM(DomainBedAlgorithm):
    """``featurizer``, ``classifier`` (always linear, as DomainBed's) and the ``update_count`` buffer are the
    state dict (DomainBed's keys). DomainBed keeps the per-domain classifiers ``clist`` (``num_domains + 1``
    of them, the last never used), their SGD optimizers ``olist`` and the weights ``alpha`` in plain Python
    attributes, outside its state dict: so does this class. They follow the module's device and dtype
    (``alpha`` stays float32, as DomainBed's) and are saved in Lightning's checkpoints, so resume is exact."""

    ddp_refusal = (
        "its per-domain classifiers, their Hessians and the transfer risks are over every domain's whole minibatch, "
        "which a rank's shard does not hold"
    )
    quirks = (
        "the per-domain classifiers (clist), their optimizers and the weights alpha are outside the state dict: "
        "DomainBed's model.pkl lacks them, so a loaded model starts them afresh (Lightning's checkpoints keep them)",
        "the Neumann series' first term is aliased to its second (in-place v -= hv on h_estimate's tensor)",
        "the transfer risks are weighted by alpha[Q, i].data, whose in-place GroupDRO update comes before the "
        "backward: the forward uses the old weights, the gradient the updated ones",
        "clist holds num_domains + 1 classifiers, the last never trained; the classifier is linear whatever "
        "nonlinear_classifier says",
        "alpha is float32 whatever the module's dtype",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))
        self.featurizer = self.make_featurizer()
        self.classifier = nn.Linear(self.featurizer.n_outputs, self.num_classes)
        # A list, not a ModuleList: outside the state dict, as DomainBed's (issue 27).
        self.clist = [nn.Linear(self.featurizer.n_outputs, self.num_classes) for _ in range(self.num_domains + 1)]
        self.olist = [torch.optim.SGD(c.parameters(), lr=INNER_LR) for c in self.clist]
        # initial weights
        self.alpha = torch.ones((self.num_domains, self.num_domains)) - torch.eye(self.num_domains)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TRM:
        # .to(device/dtype), .double(), Lightning's precision: the unregistered classifiers follow the module
        # (DomainBed's are .cuda() like it), alpha its device only.
        super()._apply(fn, *args, **kwargs)
        for classifier in self.clist:
            classifier._apply(fn, *args, **kwargs)
        self.olist = [torch.optim.SGD(c.parameters(), lr=INNER_LR) for c in self.clist]  # stateless SGD
        self.alpha = self.alpha.to(device=fn(torch.zeros(())).device)
        return self

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer_f": adam(self.featurizer.parameters(), self.hparams), "optimizer_c": adam(self.classifier.parameters(), self.hparams)}  # fmt: skip

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        hparams = self.hparams
        loss_swap: Tensor | float = 0.0
        transfer = int(self.update_count.item()) >= hparams["iters"]
        self.featurizer.train()
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        if transfer:
            if hparams["class_balanced"]:  # for stability when facing unbalanced labels across environments
                for classifier in self.clist:
                    classifier.weight.data = copy.deepcopy(self.classifier.weight.data)
            self.alpha /= self.alpha.sum(1, keepdim=True)
            all_feature = self.featurizer(all_x)
            loss = F.cross_entropy(self.classifier(all_feature), all_y)  # updating the original network
            sizes = [len(y) for _, y in minibatches]
            feature_split = list(all_feature.split(sizes))
            y_split = [y for _, y in minibatches]
            for _ in range(INNER_STEPS):
                loss_erm = sum(
                    F.cross_entropy(self.clist[j](feature.detach()), y)
                    for j, (feature, y) in enumerate(zip(feature_split, y_split))
                )
                for opt in self.olist:
                    opt.zero_grad()
                self.manual_backward(loss_erm)
                for opt in self.olist:
                    opt.step()
            # estimate the transfer risk
            for q in range(len(minibatches)):
                others = [i for i in range(len(minibatches)) if i != q]
                loss_q = F.cross_entropy(self.clist[q](feature_split[q]), y_split[q])
                grad_q = autograd.grad(loss_q, self.clist[q].weight, create_graph=True)
                vec_grad_q = nn.utils.parameters_to_vector(grad_q)
                # alpha[q, i].data: autograd keeps that view, so the in-place update below reaches the backward
                # (DomainBed's; the tests' reference writes it out).
                loss_p = [
                    F.cross_entropy(self.clist[q](feature_split[i]), y_split[i]) * self.alpha[q, i].data.detach()
                    if i in others
                    else 0.0
                    for i in range(len(minibatches))
                ]
                loss_p_sum = sum(loss_p)
                grad_p = autograd.grad(loss_p_sum, self.clist[q].weight, create_graph=True)
                vec_grad_p = nn.utils.parameters_to_vector(grad_p).detach()
                vec_grad_p = neumann_inverse_hvp(vec_grad_p, self.clist[q], (feature_split[q], y_split[q]))
                loss_swap = loss_swap + (loss_p_sum - hparams["cos_lambda"] * (vec_grad_p.detach() @ vec_grad_q))
                for i in others:
                    self.alpha[q, i] *= (hparams["groupdro_eta"] * loss_p[i].data).exp()
            loss_swap = loss_swap / len(minibatches)
        else:  # ERM
            loss = F.cross_entropy(self.classifier(self.featurizer(all_x)), all_y)
        nll = loss.item()
        self.optimizer_named("optimizer_c").zero_grad()
        self.optimizer_named("optimizer_f").zero_grad()
        objective = loss + loss_swap if transfer else loss
        self.manual_backward(objective)
        self.step("optimizer_f")
        self.step("optimizer_c")
        self.update_count += 1
        return {"nll": nll, "trm_loss": objective.item() - nll}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    # --- the state DomainBed keeps outside its state dict, in Lightning's checkpoints ------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trm_clist"] = [copy.deepcopy(c.state_dict()) for c in self.clist]
        checkpoint["trm_alpha"] = self.alpha.clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before its precision plugin converts the module: the saved tensors keep their
        # dtype (a float64 run's weights not rounded through float32); the conversion then applies to them too.
        if "trm_clist" in checkpoint:
            for classifier, state in zip(self.clist, checkpoint["trm_clist"]):
                for name, parameter in classifier.named_parameters():  # the same Parameters: olist keeps them
                    parameter.data = state[name].to(parameter.device).clone()
            self.alpha = checkpoint["trm_alpha"].to(device=self.alpha.device, dtype=torch.float32)
