"""The embedded default dataset: Colored MNIST's structure (Arjovsky et al. 2019) on small vectors,
generated in memory, so ``python train.py`` runs anywhere in a minute or two.

Each sample has an *invariant* feature, a shape whose class predicts the label in 75 % of samples in
every domain (the label is flipped with probability 0.25), and a *spurious* feature, a colour that
agrees with the label in a share of samples that changes with the domain: 90 % and 80 % in the two
training domains, 10 % in domain 0, the test domain (``test_envs=[0]``, the app's default). ERM
follows the colour (more predictive in training) and falls far below 50 % on domain 0; a predictor
that is invariant across domains, which Fishr looks for, reads the shape and keeps ~75 %.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from fishr_lightning.app.data.specs import SYNTHETIC_SPEC, MultiDomainData
from fishr_lightning.app.seeding import seed_hash

# The share of samples whose colour agrees with the label, per domain; domain 0 reverses the others.
SPURIOUS_AGREEMENT = (0.1, 0.9, 0.8)
LABEL_NOISE = 0.25
SAMPLES_PER_DOMAIN = 20000
SHAPE_DIMS = 8  # the shape is a pattern over these dims; its class is readable through the noise
COLOUR_DIMS = 2
NOISE_DIMS = 6

assert SYNTHETIC_SPEC.input_shape == (SHAPE_DIMS + COLOUR_DIMS + NOISE_DIMS,)


def synthetic_domain(
    spurious_agreement: float, n: int, generator: torch.Generator, shape_patterns_2S: Tensor
) -> TensorDataset:
    shape_class_N = torch.randint(0, 2, (n,), generator=generator)
    label_N = shape_class_N ^ (torch.rand(n, generator=generator) < LABEL_NOISE).long()
    colour_N = label_N ^ (torch.rand(n, generator=generator) >= spurious_agreement).long()
    shape_NS = shape_patterns_2S[shape_class_N] + 0.5 * torch.randn(n, SHAPE_DIMS, generator=generator)
    # The colour is one-hot over two channels, like Colored MNIST's red/green channels.
    colour_NC = torch.nn.functional.one_hot(colour_N, COLOUR_DIMS).float() + 0.1 * torch.randn(
        n, COLOUR_DIMS, generator=generator
    )
    noise_NK = torch.randn(n, NOISE_DIMS, generator=generator)
    return TensorDataset(torch.cat([shape_NS, colour_NC, noise_NK], dim=1), label_N)


def synthetic_domains(seed: int = 0, samples_per_domain: int = SAMPLES_PER_DOMAIN) -> MultiDomainData:
    """The three domains; the same ``seed`` gives the same data (a local generator, not the global RNG)."""
    generator = torch.Generator().manual_seed(seed_hash("Synthetic", seed))
    shape_patterns_2S = torch.randn(2, SHAPE_DIMS, generator=generator)
    domains: list[Dataset] = [
        synthetic_domain(agreement, samples_per_domain, generator, shape_patterns_2S)
        for agreement in SPURIOUS_AGREEMENT
    ]
    return MultiDomainData(spec=SYNTHETIC_SPEC, domains=domains, input_shape=SYNTHETIC_SPEC.input_shape)
