"""Domain-adversarial training, DomainBed's ``AbstractDANN``, ``DANN`` and ``CDANN`` (issue 26).

DANN: Ganin et al., *Domain-Adversarial Training of Neural Networks*, JMLR 2016. CDANN: Li et al., *Deep
Domain Generalization via Conditional Invariant Adversarial Networks*, ECCV 2018. A discriminator ``D``
(DomainBed's ``networks.MLP``) learns the domain ``e`` of each feature ``z = f(x)`` (CDANN: of
``z + u_y``, a learned embedding of the class), and the featurizer and classifier learn to fool it:

    L_D = CE(D(z), e) + grad_penalty · mean_i ‖∇_{z_i} Σ_j CE(D(z_j), e_j)‖²
    L_G = CE(c(z), y) − λ · L_D

alternating ``d_steps_per_g_step`` discriminator steps (Adam ``disc_opt`` on ``D`` and the embeddings) with
one generator step (Adam ``gen_opt`` on ``f`` and ``c``), both with ``betas=(beta1, 0.9)``. CDANN weights
each sample's ``CE(D(·), e)`` by ``1 / (n_y · K)`` so that every class counts alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import MLP, Classifier


class AbstractDANN(DomainBedAlgorithm):
    """DomainBed's ``AbstractDANN(conditional, class_balance)``: ``featurizer``, ``classifier``,
    ``discriminator`` (MLP ``n_outputs → num_domains``), ``class_embeddings`` (``num_classes × n_outputs``),
    the ``update_count`` buffer that drives the alternation; optimizers ``disc_opt`` then ``gen_opt``."""

    conditional: ClassVar[bool] = False
    class_balance: ClassVar[bool] = False
    quirks: ClassVar[tuple[str, ...]] = (
        "The generator's loss subtracts λ times the discriminator's whole loss, gradient penalty included: "
        "the generator step ascends the penalty.",
        "update_count is incremented before the alternation reads it: with d_steps_per_g_step=1 the first "
        "update is a generator step, then discriminator and generator steps alternate.",
        "class_embeddings exist (and are in disc_opt) for DANN too, which never uses them.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))
        self.featurizer = self.make_featurizer()
        self.classifier = Classifier(self.featurizer.n_outputs, self.num_classes, self.hparams["nonlinear_classifier"])
        self.discriminator = MLP(self.featurizer.n_outputs, self.num_domains, self.hparams)
        self.class_embeddings = nn.Embedding(self.num_classes, self.featurizer.n_outputs)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.hparams["beta1"], 0.9)
        return {
            "disc_opt": torch.optim.Adam(
                [*self.discriminator.parameters(), *self.class_embeddings.parameters()],
                lr=self.hparams["lr_d"],
                weight_decay=self.hparams["weight_decay_d"],
                betas=betas,
            ),
            "gen_opt": torch.optim.Adam(
                [*self.featurizer.parameters(), *self.classifier.parameters()],
                lr=self.hparams["lr_g"],
                weight_decay=self.hparams["weight_decay_g"],
                betas=betas,
            ),
        }

    def discriminator_loss(self, disc_out: Tensor, disc_labels: Tensor, all_y: Tensor) -> Tensor:
        """The mean cross-entropy of the domain labels; CDANN's class balance weights each sample by
        ``1 / (n_y · K)`` with ``K`` the width of ``F.one_hot(all_y)`` (the largest label + 1, DomainBed's)."""
        if not self.class_balance:
            return F.cross_entropy(disc_out, disc_labels)
        y_counts = F.one_hot(all_y).sum(dim=0)
        weights = 1.0 / (y_counts[all_y] * y_counts.shape[0]).float()  # float32, as DomainBed's .float()
        return (weights * F.cross_entropy(disc_out, disc_labels, reduction="none")).sum()

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        self.update_count += 1
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        all_z = self.featurizer(all_x)
        disc_input = all_z + self.class_embeddings(all_y) if self.conditional else all_z
        disc_out = self.discriminator(disc_input)
        disc_labels = torch.cat(
            [torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device) for i, (x, _) in enumerate(minibatches)]
        )
        disc_loss = self.discriminator_loss(disc_out, disc_labels, all_y)
        # The gradient penalty on the discriminator's input (Gulrajani et al. 2017's, one-sided to zero).
        input_grad = autograd.grad(
            F.cross_entropy(disc_out, disc_labels, reduction="sum"), [disc_input], create_graph=True
        )[0]
        grad_penalty = (input_grad**2).sum(dim=1).mean(dim=0)
        disc_loss = disc_loss + self.hparams["grad_penalty"] * grad_penalty

        d_steps_per_g = self.hparams["d_steps_per_g_step"]
        if self.update_count.item() % (1 + d_steps_per_g) < d_steps_per_g:
            self.optimizer_named("disc_opt").zero_grad()
            self.manual_backward(disc_loss)
            self.step("disc_opt")
            return {"disc_loss": disc_loss.item()}
        classifier_loss = F.cross_entropy(self.classifier(all_z), all_y)
        gen_loss = classifier_loss + self.hparams["lambda"] * -disc_loss
        self.optimizer_named("disc_opt").zero_grad()
        self.optimizer_named("gen_opt").zero_grad()
        self.manual_backward(gen_loss)
        self.step("gen_opt")
        return {"gen_loss": gen_loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))


class DANN(AbstractDANN):
    """DomainBed's unconditional ``DANN``: the discriminator sees the features alone."""

    ddp_refusal = (
        "its discriminator and generator steps alternate, each leaving the other's networks without gradients, "
        "and its alternation and domain labels have not been checked under DDP against one process"
    )


class CDANN(AbstractDANN):
    """DomainBed's conditional ``CDANN``: the discriminator sees features plus class embeddings, class-balanced."""

    conditional = True
    class_balance = True
    ddp_refusal = (
        "its class-balance weights count each class over every domain's whole minibatch, which one process's "
        "shard does not hold"
    )
    quirks = (
        *AbstractDANN.quirks[:2],
        "The class-balance weights are 1 / (n_y · K) with K the largest label in the batch + 1 (F.one_hot's width), "
        "not the number of classes, and are computed in float32 (DomainBed's .float()).",
    )
