"""MLDG (Li et al., "Learning to Generalize: Meta-Learning for Domain Generalization", AAAI 2018),
DomainBed's first-order ``MLDG``.

Each update splits the domains at random into meta-train and meta-test (``n_meta_test`` of them,
DomainBed's ``split_meta_train_test``) and pairs each meta-train domain ``i`` with a meta-test domain
``j`` (both minibatches cut to the smaller one's size). For each pair a copy of the network takes one
Adam step on ``L_i`` (a fresh Adam each time), and the network's gradient gathers

    G = (1/E) Σ_pairs [ ∇L_i(θ) + β ∇L_j(θ') ],   θ' = Adam(θ, ∇L_i(θ))

(first-order MAML: no second derivatives through the inner step), then one Adam step of the network.
``β`` is ``mldg_beta``; the logged ``loss`` is ``(1/E) Σ_pairs [L_i(θ) + β L_j(θ')]``.
"""

from __future__ import annotations

import copy
import warnings
from itertools import cycle
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, autograd

from fishr_lightning.domainbed.algorithm import DomainBedError, Minibatches
from fishr_lightning.domainbed.erm import ERM
from fishr_lightning.domainbed.networks import adam


class MLDGWarning(UserWarning):
    """MLDG's update trains nothing: no meta-train domain (as DomainBed's, with n_meta_test >= domains)."""


def split_meta_train_test(
    minibatches: Minibatches, num_meta_test: int, generator: torch.Generator
) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """DomainBed's ``misc.split_meta_train_test``: a random permutation of the domains, its last
    ``num_meta_test`` the meta-test domains, each meta-train domain paired with them in turn."""
    n_domains = len(minibatches)
    perm = torch.randperm(n_domains, generator=generator).tolist()
    meta_train, meta_test = perm[: (n_domains - num_meta_test)], perm[-num_meta_test:]
    pairs = []
    for i, j in zip(meta_train, cycle(meta_test)):
        (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
        min_n = min(len(xi), len(xj))
        pairs.append(((xi[:min_n], yi[:min_n]), (xj[:min_n], yj[:min_n])))
    return pairs


class MLDG(ERM):
    """ERM's networks and Adam; the update is DomainBed's first-order MLDG."""

    ddp_refusal = (
        "it sets the network's gradient by hand from copies of the network stepped on each meta-train domain's "
        "whole minibatch, outside DDP's gradient averaging"
    )
    quirks = (
        "the meta-train/meta-test split is a random permutation drawn at every update (here from (seed, update))",
        "each pair's inner Adam is created afresh (no state carried between pairs or updates)",
        "first order: no second derivatives through the inner step",
        "the gradients and the logged `loss` are divided by the number of domains, not of pairs",
        "the network's own BatchNorm statistics never move (only the copies run forward)",
        "with `n_meta_test` >= the training domains (ColoredMNIST's two with the default 2) no domain is "
        "meta-train: the update steps Adam on a zero gradient (a warning says so)",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_meta_test = self.hparams["n_meta_test"]
        if (
            isinstance(self.num_meta_test, bool)
            or not isinstance(self.num_meta_test, Integral)
            or self.num_meta_test < 1
        ):
            raise DomainBedError(
                f"MLDG's n_meta_test={self.num_meta_test!r} is not a number of meta-test domains: give a positive "
                "integer (DomainBed's registry draws 1 or 2; e.g. +hparams.n_meta_test=1)."
            )

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        num_mb = len(minibatches)
        objective = 0.0

        optimizer = self.optimizer_named("optimizer")
        optimizer.zero_grad()
        for p in self.network.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        pairs = split_meta_train_test(minibatches, self.num_meta_test, self.generator("meta_split"))
        if not pairs:
            warnings.warn(
                f"MLDG with n_meta_test={self.num_meta_test} and {num_mb} training domains has no meta-train domain: "
                "as DomainBed's, the update steps Adam on a zero gradient and trains nothing (ColoredMNIST's two "
                "training domains with the default n_meta_test=2). Set +hparams.n_meta_test=1 to train.",
                MLDGWarning,
                stacklevel=2,
            )
        for (xi, yi), (xj, yj) in pairs:
            # fine-tune a copy of the network on task i, with a fresh Adam (DomainBed's inner_opt)
            inner_net = copy.deepcopy(self.network)
            inner_opt = adam(inner_net.parameters(), self.hparams)
            inner_obj = F.cross_entropy(inner_net(xi), yi)
            inner_opt.zero_grad()
            self.manual_backward(inner_obj)
            inner_opt.step()
            # the network gathers G_i; the copy now has the parameters θ − lr·Adam(G_i)
            for p_tgt, p_src in zip(self.network.parameters(), inner_net.parameters()):
                if p_src.grad is not None:
                    p_tgt.grad.data.add_(p_src.grad.data / num_mb)
            objective += inner_obj.item()
            # G_j on the copy
            loss_inner_j = F.cross_entropy(inner_net(xj), yj)
            grad_inner_j = autograd.grad(loss_inner_j, inner_net.parameters(), allow_unused=True)
            objective += (self.hparams["mldg_beta"] * loss_inner_j).item()
            for p, g_j in zip(self.network.parameters(), grad_inner_j):
                if g_j is not None:
                    p.grad.data.add_(self.hparams["mldg_beta"] * g_j.data / num_mb)

        objective /= len(minibatches)
        self.step("optimizer")
        return {"loss": objective}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.precision == "16-mixed":
            raise DomainBedError(
                "MLDG sets the network's gradient by hand from its copies' gradients, which trainer.precision="
                "16-mixed's gradient scaler would unscale without having scaled; train it with 32-true, "
                "bf16-mixed or bf16-true."
            )
