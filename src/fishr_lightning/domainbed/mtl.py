"""MTL (Blanchard et al., "Domain Generalization by Marginal Transfer Learning", JMLR 2021), DomainBed's
neural ``MTL``.

The classifier sees each sample's features next to a domain embedding, the mean feature of the
domain's minibatch, kept per training domain as an exponential moving average::

    μ_e ← ema · mean_{x∈B_e} φ(x) + (1 − ema) · μ_e,      ŷ(x) = g([φ(x) ; μ])

with the sum over domains of the domains' mean cross-entropies as the loss, one Adam step.
DomainBed's ``predict`` then overwrites the embedding with standard normal noise (``.normal_()``,
in place): the classifier's second half sees ``N(0, 1)`` draws, in training and at test time, and
the embeddings are kept (``embeddings`` buffer) but never read. This module reproduces that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import Classifier, adam
from fishr_lightning.seeds import seed_hash


class MTL(DomainBedAlgorithm):
    """``featurizer``, ``classifier`` on ``2 · n_outputs`` features, the ``embeddings`` buffer
    (``num_domains × n_outputs``, zeros), Adam on the featurizer and classifier."""

    ddp_refusal = (
        "each rank would average its own shard of a domain into the embeddings and draw its own noise, where one "
        "process averages and draws over the domain's whole minibatch"
    )
    quirks = (
        "the domain embedding is overwritten by `normal_()`: the classifier's second half sees N(0, 1) noise, in "
        "training and at test time, never the embeddings (drawn here from (seed, update) in training, from a "
        "generator seeded by (seed, update) and advanced batch after batch at test time)",
        "the `embeddings` buffer is still updated, `ema · mean + (1 − ema) · old` (`mtl_ema` weighs the new mean)",
        "the loss is the sum, not the mean, of the domains' cross-entropies",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.featurizer = self.make_featurizer()
        self.classifier = Classifier(
            self.featurizer.n_outputs * 2, self.num_classes, self.hparams["nonlinear_classifier"]
        )
        self.register_buffer("embeddings", torch.zeros(self.num_domains, self.featurizer.n_outputs))
        self.ema = self.hparams["mtl_ema"]

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": adam([*self.featurizer.parameters(), *self.classifier.parameters()], self.hparams)}

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        loss = 0
        for env, (x, y) in enumerate(minibatches):
            loss += F.cross_entropy(self.predict(x, env), y)
        optimizer = self.optimizer_named("optimizer")
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")
        return {"loss": loss.item()}

    def update_embeddings_(self, features: Tensor, env: int | None = None) -> Tensor:
        return_embedding = features.mean(0)
        if env is not None:
            return_embedding = self.ema * return_embedding + (1 - self.ema) * self.embeddings[env]
            self.embeddings[env] = return_embedding.clone().detach()
        return return_embedding.view(1, -1).repeat(len(features), 1)

    def noise_generator(self, env: int | None) -> torch.Generator:
        """Where DomainBed's ``.normal_()`` draws from its global generator: in an update, a generator of
        ``(seed, update, env)``; at test time one seeded by ``(seed, update)`` when the module is put in eval (or
        train) mode and advanced from batch to batch: independent draws for every evaluated sample, the same
        ones whenever the same model is evaluated from ``eval()`` on."""
        if env is not None:
            return self.generator(f"embedding{env}")
        if self.__dict__.get("_test_noise") is None:
            seed = seed_hash(self.seed, self.update_index, "torch", "test_embedding")
            self.__dict__["_test_noise"] = torch.Generator().manual_seed(seed)
        return self.__dict__["_test_noise"]

    def train(self, mode: bool = True) -> MTL:
        self.__dict__["_test_noise"] = None  # the test-time draws restart at each evaluation
        return super().train(mode)

    def predict(self, x: Tensor, env: int | None = None) -> Tensor:
        features = self.featurizer(x)
        embedding = self.update_embeddings_(features, env)
        # DomainBed: `embedding.normal_()`. Drawn on the CPU from our generator (the device's would need its own)
        # and put in its place; as after normal_(), no gradient flows from it to the features.
        draw_dtype = torch.float64 if embedding.dtype == torch.float64 else torch.float32
        noise = torch.randn(embedding.shape, generator=self.noise_generator(env), dtype=draw_dtype)
        embedding = noise.to(device=embedding.device, dtype=embedding.dtype)
        return self.classifier(torch.cat((features, embedding), 1))
