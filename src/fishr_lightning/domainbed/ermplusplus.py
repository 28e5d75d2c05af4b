"""ERM++ (Teterwak et al., WACV 2025, "ERM++: an improved baseline for domain generalization"), DomainBed's
``ERMPlusPlus`` as its ``train.py`` runs it: ``linear_steps + 1`` updates of the classifier alone
(``linear_optimizer``, learning rate ``linear_lr``), then of the whole network; a simple moving average of the
network's weights and buffers (``network_sma``) from update 600 on, whose BatchNorm statistics follow the
training batches unless ``freeze_bn``; predictions by the average. LARS (MoCo v3's) with ``lars``."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning.domainbed.algorithm import Minibatches
from fishr_lightning.domainbed.erm import ERM

SMA_START_ITER = 600  # DomainBed's ErmPlusPlusMovingAvg.sma_start_iter, fixed


class LARS(torch.optim.Optimizer):
    """MoCo v3's LARS (DomainBed's ``misc.LARS``): momentum SGD whose update of each matrix is scaled by
    ``trust_coefficient · ‖p‖ / ‖∇ + wd·p‖``; vectors (biases, norms) unscaled and without weight decay."""

    def __init__(
        self,
        params: Any,
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    dp = dp.mul(torch.where(param_norm > 0.0, torch.where(update_norm > 0, trust, one), one))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-group["lr"])


class ERMPlusPlus(ERM):
    """ERM's networks plus ``network_sma`` (DomainBed's keys); ``optimizer`` and ``linear_optimizer``. The
    moving average's counters are checkpointed (DomainBed keeps them as plain attributes, lost on a restart)."""

    ddp_refusal = (
        "its moving average's BatchNorm statistics would follow each rank's shard of the batch, not the whole batch"
    )
    quirks = (
        "the classifier alone trains for linear_steps + 1 updates (DomainBed's `global_iter > linear_steps`)",
        "the moving average starts at DomainBed's fixed update 600, whatever steps the run has",
        "the average's num_batches_tracked is reset to 0 at every update (DomainBed loads it without them)",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # DomainBed puts the copy in eval mode; its update and predict set the mode they need, so it is left in
        # training mode here, as Lightning expects of a module at the start of training.
        self.network_sma = copy.deepcopy(self.network)
        self.sma_start_iter = SMA_START_ITER
        self.global_iter = 0
        self.sma_count = 0

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        hparams, optimizer_class = self.hparams, LARS if self.hparams["lars"] else torch.optim.Adam
        extra = {} if hparams["lars"] else {"foreach": False}
        optimizer = optimizer_class(
            self.network.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"], **extra
        )
        linear = optimizer_class(
            self.network[1].parameters(), lr=hparams["linear_lr"], weight_decay=hparams["weight_decay"], **extra
        )
        return {"optimizer": optimizer, "linear_optimizer": linear}

    def update_sma(self) -> None:
        """DomainBed's ``ErmPlusPlusMovingAvg.update_sma``: a copy of the weights before update 600, then the
        running mean of every weight and buffer since."""
        self.global_iter += 1
        averaging = self.global_iter >= self.sma_start_iter
        if averaging:
            self.sma_count += 1
        new_dict = {}
        for (name, current), (_, average) in zip(
            self.network.state_dict().items(), self.network_sma.state_dict().items()
        ):
            if "num_batches_tracked" not in name:
                current = current.detach().clone()
                new_dict[name] = (
                    (average.detach().clone() * self.sma_count + current) / (1.0 + self.sma_count)
                    if averaging
                    else current
                )
        self.network_sma.load_state_dict(new_dict)  # BatchNorm sets the missing num_batches_tracked to 0

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        selected = "optimizer" if self.global_iter > self.hparams["linear_steps"] else "linear_optimizer"
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.network(all_x), all_y)
        self.optimizer_named(selected).zero_grad()
        self.manual_backward(loss)
        self.step(selected)
        self.update_sma()
        if not self.hparams["freeze_bn"]:
            self.network_sma.train()
            with torch.no_grad():
                self.network_sma(all_x)
        return {"loss": loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        self.network_sma.eval()
        return self.network_sma(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ermplusplus"] = {"global_iter": self.global_iter, "sma_count": self.sma_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("ermplusplus", {})
        self.global_iter, self.sma_count = counters.get("global_iter", 0), counters.get("sma_count", 0)
