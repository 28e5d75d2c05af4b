"""Style-agnostic networks, DomainBed's ``SagNet`` (issue 26).

Nam et al., *Reducing Domain Gap by Reducing Style Bias*, CVPR 2021 (arXiv:1910.11645), Algorithm 1, as
DomainBed computes it on the featurizer's output ``z`` (per sample: mean ``μ`` and variance ``σ²`` over the
features). Each randomisation draws ``α ~ U(0, 1)`` per sample and a permutation ``π`` of the batch:

    style randomisation:   ẑ = (z − μ)/√(σ² + ε) · √(α σ² + (1−α) σ²_π + ε) + α μ + (1−α) μ_π
    content randomisation: ẑ = sg[(z − μ)/√(σ² + ε)]_π · √(σ² + ε) + μ

with ``ε = 1e-5``. One update, three Adams (``optimizer_f``, ``optimizer_c``, ``optimizer_s``):

    1. content: ``network_f`` and ``network_c`` descend ``CE(network_c(style-randomised z), y)``;
    2. style: ``network_s`` descends ``CE(network_s(content-randomised z), y)``;
    3. adversary: ``network_f`` descends ``sag_w_adv · mean_i mean_k −log softmax(network_s(content-randomised z_i))_k``,
       the style network's cross-entropy with the uniform distribution.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import Classifier, adam


class SagNet(DomainBedAlgorithm):
    """DomainBed's ``SagNet``: ``network_f`` (the featurizer), ``network_c`` (content head, the classifier),
    ``network_s`` (style head); ``.featurizer`` and ``.classifier`` name ``network_f`` and ``network_c``."""

    ddp_refusal = (
        "its randomisations swap feature statistics between samples of every domain's whole minibatch (a "
        "permutation of the whole batch), which one process's shard does not hold"
    )
    quirks: ClassVar[tuple[str, ...]] = (
        "The randomisations act on the featurizer's output vector (each sample's mean and variance over its "
        "features), not on the paper's intermediate ResNet maps.",
        "optimizer_f steps twice per update (after the content loss and after the adversarial loss): its Adam "
        "counts two steps per update.",
        "Each of the three forwards draws its own α and permutation (the adversarial step does not reuse the style "
        "step's), and the content randomisation draws an α it does not use.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network_f = self.make_featurizer()
        n_outputs, nonlinear = self.network_f.n_outputs, self.hparams["nonlinear_classifier"]
        self.network_c = Classifier(n_outputs, self.num_classes, nonlinear)
        self.network_s = Classifier(n_outputs, self.num_classes, nonlinear)
        self.weight_adv = self.hparams["sag_w_adv"]
        self._draws: torch.Generator | None = None

    @property
    def featurizer(self) -> nn.Module:
        return self.network_f

    @property
    def classifier(self) -> nn.Module:
        return self.network_c

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "optimizer_f": adam(self.network_f.parameters(), self.hparams),
            "optimizer_c": adam(self.network_c.parameters(), self.hparams),
            "optimizer_s": adam(self.network_s.parameters(), self.hparams),
        }

    def forward_c(self, x: Tensor) -> Tensor:
        """The content network on style-randomised features."""
        return self.network_c(self.randomize(self.network_f(x), "style"))

    def forward_s(self, x: Tensor) -> Tensor:
        """The style network on content-randomised features."""
        return self.network_s(self.randomize(self.network_f(x), "content"))

    def randomize(self, x: Tensor, what: str = "style", eps: float = 1e-5) -> Tensor:
        """DomainBed's ``randomize``; its ``torch.rand`` and ``torch.randperm`` draw from this update's generator,
        in DomainBed's order (α, then the permutation), so the stream is that of DomainBed's global RNG."""
        generator = self._draws if self._draws is not None else self.generator("sagnet")
        sizes = x.size()
        # float32 whatever the default dtype (Lightning's 64-true sets float64): DomainBed's draws and stream
        alpha = torch.rand(sizes[0], 1, generator=generator, dtype=torch.float32).to(x.device)
        if len(sizes) == 4:
            x = x.view(sizes[0], sizes[1], -1)
            alpha = alpha.unsqueeze(-1)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True)
        x = (x - mean) / (var + eps).sqrt()
        idx_swap = torch.randperm(sizes[0], generator=generator)
        if what == "style":
            mean = alpha * mean + (1 - alpha) * mean[idx_swap]
            var = alpha * var + (1 - alpha) * var[idx_swap]
        else:
            x = x[idx_swap].detach()
        x = x * (var + eps).sqrt() + mean
        return x.view(*sizes)

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        self._draws = self.generator("sagnet")  # one stream for the update's three randomisations
        try:
            # learn content
            self.optimizer_named("optimizer_f").zero_grad()
            self.optimizer_named("optimizer_c").zero_grad()
            loss_c = F.cross_entropy(self.forward_c(all_x), all_y)
            self.manual_backward(loss_c)
            self.step("optimizer_f")
            self.step("optimizer_c")

            # learn style
            self.optimizer_named("optimizer_s").zero_grad()
            loss_s = F.cross_entropy(self.forward_s(all_x), all_y)
            self.manual_backward(loss_s)
            self.step("optimizer_s")

            # learn adversary
            self.optimizer_named("optimizer_f").zero_grad()
            loss_adv = -F.log_softmax(self.forward_s(all_x), dim=1).mean(1).mean()
            loss_adv = loss_adv * self.weight_adv
            self.manual_backward(loss_adv)
            self.step("optimizer_f")
        finally:
            self._draws = None
        return {"loss_c": loss_c.item(), "loss_s": loss_s.item(), "loss_adv": loss_adv.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network_c(self.network_f(x))
