"""Gradient masks by sign agreement across domains, as DomainBed's ``ANDMask`` and ``SANDMask``: each domain's
gradient of its mean cross-entropy ``g_e = ∇θ CE_e`` (one forward per domain), then per parameter tensor

    ``θ.grad = m ⊙ mean_e g_e / (1e-10 + mean(m))``

and one Adam step, where the mask ``m`` (per parameter entry) measures how much the domains' signs agree,
``a = |mean_e sign(g_e)|``:

- AND-mask (Parascandolo et al., *Learning explanations that are hard to vary*, ICLR 2021):
  ``m = [a ≥ tau]`` (0 or 1);
- SAND-mask (Shahtalebi et al., *SAND-mask: an enhanced gradient masking strategy for the discovery of
  invariances in domain generalization*, 2021): ``m = max(0, tanh(k · (a − tau) / var_e(g_e)))``, the
  unbiased variance over domains (a NaN variance is ``1e-17``, a NaN mask entry ``1e-17``).

Dividing by the mask's mean rescales the kept entries so the step's size does not shrink with the mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from fishr_lightning.domainbed.algorithm import DomainBedError, Minibatches
from fishr_lightning.domainbed.erm import ERM


class AbstractGradientMask(ERM):
    """ERM's networks and Adam; the update masks the mean of the domains' gradients (``mask``)."""

    ddp_refusal = (
        "its masks are built from each domain's gradient taken by autograd.grad, which DDP does not all-reduce: "
        "every rank would mask its own shard's gradients and the replicas would drift apart"
    )
    # DomainBed's SANDMask keeps the graph of each domain's forward after its gradient (retain_graph=True).
    retain_graph = False

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        # DomainBed's self.network.parameters(), less frozen ones (the app's init=linear_probe freezes the
        # featurizer): autograd.grad refuses a tensor that does not require grad. All train in DomainBed.
        parameters = [p for p in self.network.parameters() if p.requires_grad]
        mean_loss = 0.0
        param_gradients: list[list[Tensor]] = [[] for _ in parameters]
        for x, y in minibatches:
            logits = self.network(x)
            env_loss = F.cross_entropy(logits, y)
            mean_loss += env_loss.item() / len(minibatches)
            env_grads = autograd.grad(env_loss, parameters, retain_graph=self.retain_graph)
            for grads, env_grad in zip(param_gradients, env_grads):
                grads.append(env_grad)
        self.optimizer_named("optimizer").zero_grad()
        self.mask_grads(param_gradients, parameters)
        self.step("optimizer")
        self.after_step()
        return {"loss": mean_loss}

    def mask_grads(self, gradients: list[list[Tensor]], params: Iterable[nn.Parameter]) -> None:
        """Set each parameter's ``.grad`` to its masked, rescaled mean gradient over the domains."""
        for param, grads in zip(params, gradients):
            grads_DX = torch.stack(grads, dim=0)
            mask = self.mask(grads_DX)
            param.grad = self.masked_gradient(mask, grads_DX.mean(dim=0)).to(param.dtype)

    def mask(self, grads_DX: Tensor) -> Tensor:
        """The mask of one parameter tensor from its domains' gradients ``[domains, *shape]``."""
        raise NotImplementedError

    def masked_gradient(self, mask: Tensor, avg_grad: Tensor) -> Tensor:
        """DomainBed's ``param.grad = mask * avg_grad; param.grad *= 1 / (1e-10 + mask_t)``."""
        mask_t = mask.sum() / mask.numel()
        grad = mask * avg_grad
        grad *= 1.0 / (1e-10 + mask_t)
        return grad

    def after_step(self) -> None:
        """After the optimizer's step (SAND-mask counts its updates)."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.precision == "16-mixed":
            raise DomainBedError(
                f"{type(self).__name__} sets the parameters' gradients itself (its masked mean of the domains' "
                "gradients), which trainer.precision=16-mixed's gradient scaler would divide by its scale; train it "
                "with 32-true, bf16-mixed or bf16-true."
            )


class ANDMask(AbstractGradientMask):
    """DomainBed's ``ANDMask``: keep the entries whose sign agrees in a fraction ``tau`` of the domains."""

    quirks = (
        "the mask is made float32 (mask.to(torch.float32)), so the rescaling 1/(1e-10 + mean(mask)) is computed in "
        "float32 whatever the training precision",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tau = self.hparams["tau"]

    def mask(self, grads_DX: Tensor) -> Tensor:
        grad_signs = torch.sign(grads_DX)
        mask = torch.mean(grad_signs, dim=0).abs() >= self.tau
        return mask.to(torch.float32)


class SANDMask(AbstractGradientMask):
    """DomainBed's ``SANDMask``: a smooth mask ``tanh(k · (agreement − tau) / variance)``, clipped at 0.

    Its ``update_count`` buffer (DomainBed's, a key of its state dict) counts the updates; its Adam has
    DomainBed's explicit ``betas=(0.9, 0.999)``, Adam's defaults, so it is ERM's optimizer."""

    retain_graph = True
    quirks = (
        "with its registry default tau=1 the mask is 0 wherever the domains' variance is finite (all signs agreeing "
        "gives tanh(0) = 0): the default update changes the weights only through Adam's weight decay",
        "a parameter entry whose domains' variance is 0 gets tanh(k·∞·(a − tau)): 1 where a > tau, 0 where "
        "a < tau, and 1e-17 where a = tau (∞·0 is NaN)",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tau = self.hparams["tau"]
        self.k = self.hparams["k"]
        self.register_buffer("update_count", torch.tensor([0]))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": torch.optim.Adam(
            self.network.parameters(),
            lr=self.hparams["lr"],
            weight_decay=self.hparams["weight_decay"],
            betas=(0.9, 0.999),
        )}  # fmt: skip

    def mask(self, grads_DX: Tensor) -> Tensor:
        grad_signs = torch.sign(grads_DX)
        gamma = torch.tensor(1.0).to(grads_DX.device)
        grads_var = grads_DX.var(dim=0)
        grads_var[torch.isnan(grads_var)] = 1e-17
        lam = (gamma * grads_var).pow(-1)
        mask = torch.tanh(self.k * lam * (torch.abs(grad_signs.mean(dim=0)) - self.tau))
        mask = torch.max(mask, torch.zeros_like(mask))
        mask[torch.isnan(mask)] = 1e-17
        return mask

    def after_step(self) -> None:
        self.update_count += 1
