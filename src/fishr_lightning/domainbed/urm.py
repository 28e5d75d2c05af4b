"""URM (Krishnamachari et al., TMLR 2024, "Uniformly distributed feature representations for fair and robust
learning"), DomainBed's ``URM``: ERM whose features are also pushed towards a uniform distribution by an
adversary. The featurizer's output goes through ``urm_generator_output`` (tanh: features in ``(−1, 1)``); a
discriminator (an MLP with LeakyReLUs) learns to tell uniform noise on that range (label 1) from the features
(label 0), and the featurizer is trained to pass for noise:

    generator:      CE(classifier(z), y) + urm_adv_lambda · BCE(D(z), 1)
    discriminator:  BCE(D(u), 1) + urm_adv_lambda · BCE(D(z.detach()), 0),   u ~ U[a, b)^D
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedError, Minibatches
from fishr_lightning.domainbed.erm import ERM

OUTPUT_ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity, "relu": nn.ReLU}
NOISE_RANGES = {"tanh": (-1.0, 1.0), "relu": (0.0, 1.0), "sigmoid": (0.0, 1.0)}


class URM(ERM):
    """ERM's networks and optimizer, then ``discriminator`` and ``discriminator_opt`` (DomainBed's names). The
    noise and the soft labels are drawn from ``self.generator()``: they depend only on ``(seed, update)``."""

    ddp_refusal = "its discriminator steps on each rank's features alone; it has not been checked against one process"
    quirks = (
        "the generator's output activation is set on the featurizer's `activation` (DomainBed's networks have one); "
        "a featurizer without one gets it through a forward hook",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        output = self.hparams["urm_generator_output"]
        if output not in OUTPUT_ACTIVATIONS:
            raise DomainBedError(
                f"urm_generator_output={output!r}: DomainBed's URM knows {', '.join(OUTPUT_ACTIVATIONS)}."
            )
        if hasattr(self.featurizer, "activation"):
            self.featurizer.activation = OUTPUT_ACTIVATIONS[output]()
        else:
            self.featurizer.add_module("activation", OUTPUT_ACTIVATIONS[output]())
            self.featurizer.register_forward_hook(lambda module, args, features: module.activation(features))
        self.discriminator = nn.Sequential()
        self.discriminator.add_module("dense1", nn.Linear(self.featurizer.n_outputs, 100))
        self.discriminator.add_module("act1", nn.LeakyReLU())
        for layer in range(self.hparams["urm_discriminator_hidden_layers"]):
            self.discriminator.add_module(f"dense{2 + layer}", nn.Linear(100, 100))
            self.discriminator.add_module(f"act2{2 + layer}", nn.LeakyReLU())
        self.discriminator.add_module("output", nn.Linear(100, 1))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        hparams = self.hparams
        discriminator = self.discriminator.parameters()
        if hparams["urm_discriminator_optimizer"] == "sgd":
            lr, wd = hparams["urm_discriminator_lr"], hparams["weight_decay"]
            discriminator_opt = torch.optim.SGD(discriminator, lr=lr, weight_decay=wd, momentum=0.9)
        elif hparams["urm_discriminator_optimizer"] == "adam":
            discriminator_opt = torch.optim.Adam(
                discriminator, lr=hparams["urm_discriminator_lr"], weight_decay=hparams["weight_decay"]
            )
        else:
            raise DomainBedError(
                f"urm_discriminator_optimizer={hparams['urm_discriminator_optimizer']!r}: DomainBed's URM knows sgd, adam."
            )
        return {**super().build_optimizers(), "discriminator_opt": discriminator_opt}

    def draw_noise(self, features_ND: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """This update's uniform noise ``U[a, b)`` shaped as the features, and with label smoothing the soft
        labels of the noise (in ``[1 − s, 1]``) and of the features (in ``[0, s]``)."""
        output = self.hparams["urm_generator_output"]
        if output not in NOISE_RANGES:
            raise DomainBedError(
                f"urm_generator_output={output!r}: DomainBed's URM draws noise for tanh, relu, sigmoid."
            )
        low, high = NOISE_RANGES[output]
        generator = self.generator()
        N = len(features_ND)
        uniform = torch.rand(features_ND.shape, generator=generator, dtype=features_ND.dtype)
        noise = ((high - low) * uniform + low).to(features_ND.device)
        smoothing = self.hparams["urm_discriminator_label_smoothing"]
        if not smoothing:
            return noise, None, None
        true_y = (smoothing * torch.rand(N, generator=generator) + (1 - smoothing)).to(features_ND)
        fake_y = (smoothing * torch.rand(N, generator=generator)).to(features_ND)
        return noise, true_y, fake_y

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        features = self.featurizer(all_x)
        ones = torch.ones(len(features), dtype=features.dtype, device=features.device)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(features).squeeze(1), ones)
        loss = F.cross_entropy(self.classifier(features), all_y) + self.hparams["urm_adv_lambda"] * g_loss
        self.optimizer_named("optimizer").zero_grad()
        self.manual_backward(loss)
        self.step("optimizer")

        features = features.detach()  # the discriminator's step does not reach the encoder
        noise, true_y, fake_y = self.draw_noise(features)
        true_y = ones if true_y is None else true_y
        fake_y = torch.zeros_like(ones) if fake_y is None else fake_y
        noise_loss = F.binary_cross_entropy_with_logits(self.discriminator(noise).squeeze(1), true_y)
        feats_loss = F.binary_cross_entropy_with_logits(self.discriminator(features).squeeze(1), fake_y)
        d_loss = noise_loss + self.hparams["urm_adv_lambda"] * feats_loss
        self.optimizer_named("discriminator_opt").zero_grad()
        self.manual_backward(d_loss)
        self.step("discriminator_opt")
        return {"loss": loss.item()}
