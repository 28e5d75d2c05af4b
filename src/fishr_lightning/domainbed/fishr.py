"""Fishr (Rame, Dancette & Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization",
ICML 2022, Eq. 4–6), DomainBed's ``Fishr``: ``featurizer → classifier`` (a linear head), Adam, the objective
``CE + λ_t · mean_e mean_p (m_e/(1−γ) − mean_e m_e/(1−γ))²`` over each domain's EMA ``m_e`` of the variances
of the head's per-sample gradients, ``λ_t = 0`` before ``penalty_anneal_iters`` updates and ``lambda`` from
then on, Adam re-created at the switch (when it is not update 0). The penalty is ``FishrPenalty``'s closed form
(``shared/DESIGN.md``), equal to DomainBed's BackPACK ``BatchGrad`` route."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, DomainBedError, Minibatches
from fishr_lightning.domainbed.minibatches import concatenate
from fishr_lightning.domainbed.networks import Classifier, adam
from fishr_lightning.penalty import FishrPenalty

# Where on_save_checkpoint keeps the EMA of every domain's gradient variances, which DomainBed's state dict
# (and so the module's) does not hold: a resumed run continues the uninterrupted run's averages.
EMA_CHECKPOINT_KEY = "domainbed_fishr_ema"


class Fishr(DomainBedAlgorithm):
    """DomainBed's ``featurizer``, ``classifier``, ``network = Sequential(featurizer, classifier)`` and
    ``update_count`` (its state dict: BackPACK's ``extend`` of the classifier and its ``bce_extended`` add no
    key), its ``optimizer`` over the featurizer's and the classifier's parameters."""

    ddp_refusal = (
        "its penalty needs the gradient variances of each domain's whole minibatch (FishrCallback all-reduces "
        "them under DDP; this class does not)"
    )
    quirks = (
        "penalty weight 0 before penalty_anneal_iters updates, lambda after",
        "Adam re-created (its state forgotten) at update penalty_anneal_iters, unless that is 0",
        "the EMA of each domain's gradient variances moves at every update, during the warm-up too",
        "the EMA (with its 1/(1 − ema) correction) is not in DomainBed's state dict: a Lightning checkpoint keeps it",
        "update_count buffer in the state dict",
        "the logged loss is the objective (cross-entropy plus the weighted penalty)",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.hparams["nonlinear_classifier"]:
            raise DomainBedError(
                "Fishr's penalty here is the closed form of a linear head's per-sample gradients; "
                "nonlinear_classifier=True (a three-layer head) is not supported. Use nonlinear_classifier=False "
                "(DomainBed's default, and its only random-search value)."
            )
        self.featurizer = self.make_featurizer()
        self.classifier = Classifier(self.featurizer.n_outputs, self.num_classes, False)
        self.network = torch.nn.Sequential(self.featurizer, self.classifier)
        self.register_buffer("update_count", torch.tensor([0]))
        self.fishr_penalty = FishrPenalty(num_domains=self.num_domains, ema=self.hparams["ema"])

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        parameters = list(self.featurizer.parameters()) + list(self.classifier.parameters())
        return {"optimizer": adam(parameters, self.hparams)}

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        if len(minibatches) != self.num_domains:
            raise DomainBedError(
                f"Fishr was built for {self.num_domains} training domains but this batch holds {len(minibatches)}: "
                "every batch needs one minibatch of each training domain (DomainBed's assertion)."
            )
        all_x, all_y, domain_N = concatenate(minibatches)
        all_z = self.featurizer(all_x)
        all_logits = self.classifier(all_z)
        penalty_weight = 0.0
        if self.update_count >= self.hparams["penalty_anneal_iters"]:
            penalty_weight = self.hparams["lambda"]
            if self.update_count == self.hparams["penalty_anneal_iters"] != 0:  # "Reset Adam as in IRM or V-REx"
                self.reset_optimizer("optimizer")
        # The EMA moves at every update; during the warm-up (weight 0) the penalty carries no graph: same numbers.
        penalty = self.fishr_penalty.penalty_for_weight(
            penalty_weight, all_z, all_logits, all_y, domain_N, head=self.classifier
        )
        all_nll = F.cross_entropy(all_logits, all_y)
        self.update_count += 1
        objective = all_nll + penalty_weight * penalty
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(objective)
        self.step("optimizer")
        return {"loss": objective.item(), "nll": all_nll.item(), "penalty": penalty.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[EMA_CHECKPOINT_KEY] = self.fishr_penalty.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if EMA_CHECKPOINT_KEY in checkpoint:
            self.fishr_penalty.load_state_dict(checkpoint[EMA_CHECKPOINT_KEY])
