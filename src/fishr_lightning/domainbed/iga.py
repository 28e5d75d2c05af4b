"""IGA (Koyama & Yamaguchi, *When is invariance useful in an out-of-distribution generalization problem?*,
arXiv 2008.01883v2: Inter-environmental Gradient Alignment), as DomainBed's ``IGA``: each domain's gradient
of its mean cross-entropy ``g_e = ∇θ CE_e`` (one forward per domain, with its graph), their mean
``ḡ = ∇θ mean_e CE_e``, and the objective

    ``mean_e CE_e + penalty · Σ_e ‖g_e − ḡ‖²``

(``penalty`` is the registry's name for the weight), one Adam step on the whole network. ``ḡ`` carries no
graph in DomainBed; the penalty's gradient is the same either way, since ``Σ_e (g_e − ḡ) = 0``.

The Fishr paper's ablations (Rame, Dancette & Cord 2022, Tables 11-12), options outside DomainBed's registry
(``ABLATION_HPARAMS``; absent: DomainBed's IGA):

- ``iga_classifier_only``: ``θ`` in ``g_e`` and ``ḡ`` is the classifier's parameters only (Fishr's choice of
  gradients); the penalty still trains the whole network through them.
- ``iga_ema`` (γ > 0): each ``g_e`` replaced by its exponential moving average over updates, Fishr's
  (DomainBed's ``MovingAverage`` with its ``1/(1 − γ)`` correction, ``functional.ema_update``), ``ḡ`` the mean
  of the averaged ``g_e`` over domains.
- ``iga_fishr_lambda`` (λ > 0): Fishr + IGA, the objective gains ``λ_t · P_Fishr`` on the classifier's
  per-sample gradients, Fishr's penalty exactly as DomainBed's ``Fishr`` computes it (``FishrPenalty``:
  EMA ``iga_fishr_ema``, weight 0 before ``iga_fishr_penalty_anneal_iters`` then λ, Adam re-created at that
  update when it is not 0). ``FishrCallback`` cannot do it: it adds its penalty to the loss that
  ``training_step`` returns, which manual optimisation (this module's) never backpropagates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from fishr_lightning import functional as FF
from fishr_lightning.domainbed.algorithm import DomainBedError, Minibatches
from fishr_lightning.domainbed.erm import ERM
from fishr_lightning.domainbed.hparams_registry import ABLATION_HPARAMS
from fishr_lightning.penalty import FishrPenalty


class IGA(ERM):
    """DomainBed's ``IGA``: ERM's networks and Adam (same keys), the gradient-variance penalty; the Fishr
    paper's ablations as the options ``iga_classifier_only``, ``iga_ema`` and ``iga_fishr_*``."""

    ddp_refusal = (
        "its penalty is the squared distance between each domain's whole-minibatch gradient and their mean, which "
        "neither a rank's shard nor the ranks' averaged penalties give"
    )
    quirks = (
        "the penalty sums over the domains and over every parameter of the network (not a mean): its scale, and so "
        "what the registry's penalty=1000 means, depends on the network's size",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.classifier_only = bool(self.option("iga_classifier_only"))
        self.gradient_ema = float(self.option("iga_ema"))
        self.fishr_lambda = float(self.option("iga_fishr_lambda"))
        self.fishr_anneal_iters = int(self.option("iga_fishr_penalty_anneal_iters"))
        fishr_ema = float(self.option("iga_fishr_ema"))
        for name, value in (("iga_ema", self.gradient_ema), ("iga_fishr_ema", fishr_ema)):
            if not 0.0 <= value < 1.0:
                raise DomainBedError(
                    f"hparams {name}={value} is outside [0, 1): it is an EMA's decay γ (0 turns the average off; "
                    "Fishr's is 0.95)."
                )
        if self.fishr_lambda < 0 or self.fishr_anneal_iters < 0:
            raise DomainBedError(
                f"hparams iga_fishr_lambda={self.fishr_lambda} and iga_fishr_penalty_anneal_iters="
                f"{self.fishr_anneal_iters} must be >= 0 (λ = 0 leaves Fishr's penalty out)."
            )
        self.fishr_penalty: FishrPenalty | None = None
        if self.fishr_lambda > 0:
            if not isinstance(self.classifier, nn.Linear):
                raise DomainBedError(
                    "hparams iga_fishr_lambda > 0 (Fishr + IGA) needs a linear classifier, whose per-sample "
                    "gradients Fishr's penalty takes: set nonlinear_classifier=False."
                )
            self.fishr_penalty = FishrPenalty(num_domains=self.num_domains, ema=fishr_ema)
        # Each domain's averaged gradient [domains, parameters] (iga_ema), None before the first update.
        self.gradient_ema_state: Tensor | None = None

    def option(self, name: str) -> Any:
        """An ablation option: the run's value, or its default (off) when hparams lacks it."""
        return self.hparams.get(name, ABLATION_HPARAMS[name])

    @property
    def penalised_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients IGA aligns: the whole network (DomainBed's) or the classifier's (frozen
        ones left out, as for the gradient masks: autograd.grad refuses them)."""
        network = self.classifier if self.classifier_only else self.network
        return [p for p in network.parameters() if p.requires_grad]

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        parameters = self.penalised_parameters
        total_loss: Tensor | float = 0.0
        grads, features, logits_per_domain = [], [], []
        for x, y in minibatches:
            features_e = self.featurizer(x)
            logits = self.classifier(features_e)  # DomainBed's self.network(x)
            env_loss = F.cross_entropy(logits, y)
            total_loss = total_loss + env_loss
            grads.append(autograd.grad(env_loss, parameters, create_graph=True))
            features.append(features_e)
            logits_per_domain.append(logits)

        mean_loss = total_loss / len(minibatches)
        if self.gradient_ema > 0:
            penalty_value = self.averaged_gradient_penalty(grads)
        else:
            mean_grad = autograd.grad(mean_loss, parameters, retain_graph=True)
            penalty_value = 0.0
            for grad in grads:
                for g, mean_g in zip(grad, mean_grad):
                    penalty_value = penalty_value + (g - mean_g).pow(2).sum()

        objective = mean_loss + self.hparams["penalty"] * penalty_value
        values = {"loss": mean_loss.item(), "penalty": penalty_value.item()}
        if self.fishr_penalty is not None:
            fishr_weight = self.fishr_lambda if self.update_index >= self.fishr_anneal_iters else 0.0
            if self.update_index == self.fishr_anneal_iters != 0:
                self.reset_optimizer("optimizer")  # DomainBed's Fishr re-creates Adam when λ switches on
            all_y = torch.cat([y for _, y in minibatches])
            domains = torch.cat([torch.full_like(y, e) for e, (_, y) in enumerate(minibatches)])
            fishr_value = self.fishr_penalty.penalty_for_weight(
                fishr_weight, torch.cat(features), torch.cat(logits_per_domain), all_y, domains, self.classifier
            )
            objective = objective + fishr_weight * fishr_value
            values["fishr_penalty"] = fishr_value.item()

        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(objective)
        self.step("optimizer")
        return values

    def averaged_gradient_penalty(self, grads: list[tuple[Tensor, ...]]) -> Tensor:
        """``Σ_e ‖ĝ_e − mean_e ĝ_e‖²`` with ``ĝ_e`` each domain's gradient averaged over updates (iga_ema)."""
        grads_EP = torch.stack([torch.cat([g.reshape(-1) for g in grad]) for grad in grads])
        if self.gradient_ema_state is not None and self.gradient_ema_state.shape != grads_EP.shape:
            raise DomainBedError(
                f"IGA's averaged gradients have shape {tuple(self.gradient_ema_state.shape)}, this update's "
                f"{tuple(grads_EP.shape)}: the domains or the network changed since the average began. Start afresh."
            )
        self.gradient_ema_state, averaged_EP = FF.ema_update(self.gradient_ema_state, grads_EP, self.gradient_ema)
        return (averaged_EP - averaged_EP.mean(dim=0).detach()).pow(2).sum()

    # The averages are not parameters or buffers (DomainBed's state dict has no key for them): the checkpoint
    # carries them, so a resumed run continues the uninterrupted one.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.gradient_ema_state
        checkpoint["iga_gradient_ema"] = None if state is None else state.detach().cpu().clone()
        if self.fishr_penalty is not None:
            checkpoint["iga_fishr_penalty"] = self.fishr_penalty.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.gradient_ema_state = checkpoint.get("iga_gradient_ema")  # moved to the gradients' device when used
        if self.fishr_penalty is not None and "iga_fishr_penalty" in checkpoint:
            self.fishr_penalty.load_state_dict(checkpoint["iga_fishr_penalty"])
