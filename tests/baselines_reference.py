"""An independent reference for the comparison set: DomainBed's ``update()`` of IRM, VREx, CORAL,
MMD, GroupDRO, SD and Mixup, re-implemented from the published formulas (``domainbed/algorithms.py``,
``misc.random_pairs_of_minibatches``) on a list of per-domain minibatches, the slow and obvious way.
Nothing here imports fishr_lightning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import autograd

GAMMAS = [0.001, 0.01, 0.1, 1, 10, 100, 1000]


def irm_penalty(logits, y):
    """DomainBed's ``IRM._irm_penalty``: a dummy scale, gradients of two interleaved halves."""
    scale = torch.tensor(1.0, dtype=logits.dtype).requires_grad_()
    loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
    grad_1 = autograd.grad(loss_1, [scale], create_graph=True)[0]
    grad_2 = autograd.grad(loss_2, [scale], create_graph=True)[0]
    return torch.sum(grad_1 * grad_2)


def cdist(x1, x2):
    x1_norm = x1.pow(2).sum(dim=-1, keepdim=True)
    x2_norm = x2.pow(2).sum(dim=-1, keepdim=True)
    return torch.addmm(x2_norm.transpose(-2, -1), x1, x2.transpose(-2, -1), alpha=-2).add_(x1_norm).clamp_min_(1e-30)


def gaussian_kernel(x, y):
    D = cdist(x, y)
    K = torch.zeros_like(D)
    for g in GAMMAS:
        K.add_(torch.exp(D.mul(-g)))
    return K


def mmd(x, y, gaussian):
    if gaussian:
        return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = (cent_x.t() @ cent_x) / (len(x) - 1)
    cova_y = (cent_y.t() @ cent_y) / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


def pairwise_mmd(features, gaussian):
    penalty, nmb = 0.0, len(features)
    for i in range(nmb):
        for j in range(i + 1, nmb):
            penalty += mmd(features[i], features[j], gaussian)
    return penalty / (nmb * (nmb - 1) / 2)


def random_pairs_of_minibatches(minibatches, perm):
    pairs = []
    for i in range(len(minibatches)):
        j = i + 1 if i < (len(minibatches) - 1) else 0
        xi, yi = minibatches[perm[i]]
        xj, yj = minibatches[perm[j]]
        min_n = min(len(xi), len(xj))
        pairs.append(((xi[:min_n], yi[:min_n]), (xj[:min_n], yj[:min_n])))
    return pairs


class DomainBedAlgorithm:
    """One of DomainBed's algorithms on ``network = featurizer → classifier`` with DomainBed's
    Adam (re-created at the annealing step for IRM and VREx). ``update(minibatches)`` returns
    DomainBed's dict of floats."""

    def __init__(self, name, featurizer, classifier, hparams, lr, make_optimizer=None):
        self.name, self.hparams = name, hparams
        self.featurizer, self.classifier = featurizer, classifier
        self.network = torch.nn.Sequential(featurizer, classifier)
        self.make_optimizer = make_optimizer or (lambda params: torch.optim.Adam(params, lr=lr))
        self.optimizer = self.make_optimizer(self.network.parameters())
        self.update_count = 0
        self.q = None

    def step(self, loss):
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def update(self, minibatches, lams=None, perm=None):
        return getattr(self, f"_{self.name.lower()}")(minibatches, lams=lams, perm=perm)

    def _erm(self, minibatches, **_):
        all_x = torch.cat([x for x, y in minibatches])
        all_y = torch.cat([y for x, y in minibatches])
        loss = F.cross_entropy(self.network(all_x), all_y)
        self.step(loss)
        return {"loss": loss.item()}

    def _anneal(self, lambda_key, iters_key):
        weight = self.hparams[lambda_key] if self.update_count >= self.hparams[iters_key] else 1.0
        if self.update_count == self.hparams[iters_key]:
            self.optimizer = self.make_optimizer(self.network.parameters())
        return weight

    def _irm(self, minibatches, **_):
        all_logits = self.network(torch.cat([x for x, y in minibatches]))
        nll, penalty, idx = 0.0, 0.0, 0
        for x, y in minibatches:
            logits = all_logits[idx : idx + x.shape[0]]
            idx += x.shape[0]
            nll += F.cross_entropy(logits, y)
            penalty += irm_penalty(logits, y)
        nll, penalty = nll / len(minibatches), penalty / len(minibatches)
        weight = self._anneal("irm_lambda", "irm_penalty_anneal_iters")
        loss = nll + weight * penalty
        self.step(loss)
        self.update_count += 1
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}

    def _vrex(self, minibatches, **_):
        weight = self._anneal("vrex_lambda", "vrex_penalty_anneal_iters")
        all_logits = self.network(torch.cat([x for x, y in minibatches]))
        losses = torch.zeros(len(minibatches), dtype=all_logits.dtype)
        idx = 0
        for i, (x, y) in enumerate(minibatches):
            losses[i] = F.cross_entropy(all_logits[idx : idx + x.shape[0]], y)
            idx += x.shape[0]
        mean = losses.mean()
        penalty = ((losses - mean) ** 2).mean()
        loss = mean + weight * penalty
        self.step(loss)
        self.update_count += 1
        return {"loss": loss.item(), "penalty": penalty.item()}

    def _alignment(self, minibatches, gaussian):
        features = [self.featurizer(x) for x, _ in minibatches]
        objective = sum(F.cross_entropy(self.classifier(f), y) for f, (_, y) in zip(features, minibatches))
        objective = objective / len(minibatches)
        penalty = pairwise_mmd(features, gaussian)
        self.step(objective + self.hparams["mmd_gamma"] * penalty)
        return {"loss": objective.item(), "penalty": penalty.item()}

    def _coral(self, minibatches, **_):
        return self._alignment(minibatches, gaussian=False)

    def _mmd(self, minibatches, **_):
        return self._alignment(minibatches, gaussian=True)

    def _groupdro(self, minibatches, **_):
        if self.q is None:
            self.q = torch.ones(len(minibatches), dtype=torch.float64)
        losses = torch.zeros(len(minibatches), dtype=torch.float64)
        for m, (x, y) in enumerate(minibatches):
            losses[m] = F.cross_entropy(self.network(x), y)
            self.q[m] *= (self.hparams["groupdro_eta"] * losses[m].data).exp()
        self.q /= self.q.sum()
        loss = torch.dot(losses, self.q)
        self.step(loss)
        return {"loss": loss.item()}

    def _sd(self, minibatches, **_):
        all_p = self.network(torch.cat([x for x, y in minibatches]))
        loss = F.cross_entropy(all_p, torch.cat([y for x, y in minibatches]))
        penalty = (all_p**2).mean()
        self.step(loss + self.hparams["sd_reg"] * penalty)
        return {"loss": loss.item(), "penalty": penalty.item()}

    def _mixup(self, minibatches, lams, perm):
        objective = 0
        for ((xi, yi), (xj, yj)), lam in zip(random_pairs_of_minibatches(minibatches, perm), lams):
            predictions = self.network(lam * xi + (1 - lam) * xj)
            objective += lam * F.cross_entropy(predictions, yi)
            objective += (1 - lam) * F.cross_entropy(predictions, yj)
        objective /= len(minibatches)
        self.step(objective)
        return {"loss": objective.item()}
