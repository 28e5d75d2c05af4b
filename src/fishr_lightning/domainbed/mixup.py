"""Inter-domain Mixup (Xu et al., "Adversarial Domain Adaptation with Domain Mixup", AAAI 2020; Yan et al.,
"Improve Unsupervised Domain Adaptation with Mixup Training", 2020), DomainBed's ``Mixup``: ERM's network and
Adam; for the pairs ``(i, j)`` of a random permutation of the domains, each cycled to the next
(``misc.random_pairs_of_minibatches``, ``baselines.functional.random_domain_pairs``), ``λ ~ Beta(α, α)``,
``x̃ = λ x_i + (1 − λ) x_j`` and the objective ``Σ_pairs [λ CE(f(x̃), y_i) + (1 − λ) CE(f(x̃), y_j)] / E``."""

from __future__ import annotations

from fishr_lightning.baselines.functional import mixup_inputs, mixup_loss, random_domain_pairs
from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM


class Mixup(ERM):
    """ERM's networks and ``optimizer``. The permutation (torch) and the ``λ``'s (NumPy's ``beta``, one per
    pair in pair order, as DomainBed draws them) come from ``self.generator`` / ``self.random_state``: they
    depend only on ``(seed, update)``."""

    ddp_refusal = "it mixes the whole minibatches of pairs of domains"
    quirks = (
        "pairs from one random permutation of the domains, each paired with the next, the last with the first",
        "each pair truncated to the smaller minibatch's size",
        "one λ ~ Beta(mixup_alpha, mixup_alpha) per pair, one forward per pair",
        "the objective divided by the number of domains",
    )

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        pairs = random_domain_pairs(len(minibatches), generator=self.generator("pairs"))
        lambdas = self.random_state("lambda")
        objective = 0.0
        for i, j in pairs:
            lam = float(lambdas.beta(self.hparams["mixup_alpha"], self.hparams["mixup_alpha"]))
            (x_i, y_i), (x_j, y_j) = minibatches[i], minibatches[j]
            x, n = mixup_inputs(x_i, x_j, lam)
            objective = objective + mixup_loss(self.predict(x), y_i[:n], y_j[:n], lam)
        objective = objective / len(minibatches)
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(objective)
        self.step("optimizer")
        return {"loss": objective.item()}
