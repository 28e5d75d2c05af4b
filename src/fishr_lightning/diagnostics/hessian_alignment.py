"""``HessianAlignmentCallback``: how far apart the training domains' loss landscapes are, along training.

Fishr's argument (Rame, Dancette & Cord, ICML 2022, Sections 3-4) is that the per-domain gradient
covariance ``C_e`` is close to the Fisher and to the Hessian ``H_e`` of domain ``e``'s risk, so that
matching the ``C_e`` (diagonals, Fishr's penalty) aligns the ``H_e``: the domains' loss landscapes
agree around the final weights. The paper shows it on Colored MNIST, comparing the two training
domains' Hessians and gradient variances at the end of training (Table 1) and along training
(Fig. 3). The quantities here follow the authors' Hessian-analysis variant of their Colored MNIST
script: ``diag H_e`` from BackPACK on the classifier, the squared distance between the domains'
``diag H_e`` and between their gradient variances (the ``*_pairwise_distance`` values below), and
cosine similarities; the per-domain distances to the mean are the terms of Fishr's own penalty.

Every ``every_n_steps`` optimizer steps this callback computes, for the head (final ``nn.Linear``)
and on the training batch of that step, per training domain ``e``:

- ``diag H_e``: the diagonal of the Hessian of the domain's mean loss w.r.t. the head's weight and
  bias (BackPACK ``DiagHessian``; exact for a linear head, whose only successor is the loss);
- ``Var G_e``: the centred variance of the head's per-sample gradients (the core's closed form, the
  quantity Fishr matches);

and logs under ``hessian_alignment/``, for ``X`` in ``hessian`` and ``grad_variance``:

- ``X_distance/domain_e``: ``||x_e − x̄||²`` with ``x̄ = mean_e x_e`` (for ``x = Var G``, the terms the
  Colored MNIST script's Fishr penalty sums);
- ``X_relative_distance/domain_e``: ``||x_e − x̄||² / ||x̄||²``, comparable across training although
  the curvature's scale changes by orders of magnitude;
- ``X_pairwise_distance``: ``mean_{e<e'} ||x_e − x_e'||²`` (Table 1's quantity for two domains);
- ``cosine_hessian_grad_variance/domain_e``: ``cos(diag H_e, Var G_e)``, how well the gradient variance
  stands for the curvature (the proxy Fishr relies on).

All of it runs on a detached copy of the head and of its input features: training (parameters, their
``.grad``, the autograd graph, BackPACK state of the real head) is untouched. The history is kept in
``history`` (and in checkpoints) and ``plot(path)`` draws its curves; with ``plot_filename`` set the
plot is written into the trainer's log directory when training ends.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fishr_lightning import functional as FF
from fishr_lightning import heads
from fishr_lightning.functional import FishrInputError, LossName

STATISTICS = ("hessian", "grad_variance")
LINESTYLES = ("-", "--", ":", "-.")


def head_hessian_diagonals(
    head: nn.Linear, features_ND: Tensor, targets: Tensor, domains_N: Tensor, num_domains: int, loss: LossName
) -> Tensor:
    """``[E, P]``: per domain, the diagonal of the Hessian of the domain's *mean* loss w.r.t. the
    head's parameters (weight row-major, then bias), from BackPACK's ``DiagHessian``.

    Works on a fresh ``nn.Linear`` holding a copy of the head's parameters, fed detached features,
    so nothing of the training graph or of the real head is touched. ``backward()`` is called
    without ``inputs=`` (it reaches only the copy and the detached features): with
    ``inputs=<parameters only>`` BackPACK ≥ 1.4 skips its extension hooks (BackPACK issue #233) and
    the ``diag_h`` attributes would be missing; name the features too if you pass ``inputs``.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    compute_dtype = torch.promote_types(features_ND.dtype, torch.float32)  # no half-precision curvature
    head_copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    head_copy = extend(head_copy.to(device=features_ND.device, dtype=compute_dtype))
    with torch.no_grad():
        head_copy.weight.copy_(head.weight.detach())
        if head.bias is not None:
            head_copy.bias.copy_(head.bias.detach())
    loss_module = extend(nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.BCEWithLogitsLoss())
    params = [p for p in (head_copy.weight, head_copy.bias) if p is not None]
    # A leaf of our own that requires grad: BackPACK's module hooks then see an input to
    # differentiate (PyTorch warns about full backward hooks otherwise); its .grad is discarded.
    features_ND = features_ND.detach().to(compute_dtype).requires_grad_(True)
    diagonals: list[Tensor] = []
    with torch.enable_grad(), torch.autocast(device_type=features_ND.device.type, enabled=False):
        for e in range(num_domains):
            in_domain = domains_N == e
            logits_NC = head_copy(features_ND[in_domain])
            domain_targets = targets[in_domain]
            if loss == "bce_with_logits":
                domain_targets = domain_targets.reshape(logits_NC.shape).to(compute_dtype)
            with backpack(DiagHessian()):
                loss_module(logits_NC, domain_targets).backward()
            diagonals.append(torch.cat([p.diag_h.reshape(-1) for p in params]).detach())
            for p in params:
                p.grad = None
                del p.diag_h
    return torch.stack(diagonals)


def head_gradient_variances(
    head: nn.Linear, features_ND: Tensor, targets: Tensor, domains_N: Tensor, num_domains: int, loss: LossName
) -> Tensor:
    """``[E, P]``: per domain, the centred variance of the head's per-sample gradients (the core's
    closed form; the same layout as ``head_hessian_diagonals``)."""
    compute_dtype = torch.promote_types(features_ND.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=features_ND.device.type, enabled=False):
        features_ND = features_ND.detach().to(compute_dtype)
        bias = None if head.bias is None else head.bias.detach().to(compute_dtype)
        logits_NC = nn.functional.linear(features_ND, head.weight.detach().to(compute_dtype), bias)
        delta_NC = FF.logit_gradients(logits_NC, targets, loss)
        moments = FF.closed_form_moments(features_ND, delta_NC, domains_N, num_domains, bias=head.bias is not None)
        return FF.domain_gradient_variance(moments, centered=True)


def alignment_metrics(hessian_EP: Tensor, grad_variance_EP: Tensor) -> dict[str, float]:
    """The logged quantities (see the module docstring) from the two ``[E, P]`` statistics."""
    metrics: dict[str, float] = {}
    for name, statistic_EP in (("hessian", hessian_EP), ("grad_variance", grad_variance_EP)):
        statistic_EP = statistic_EP.double()
        mean_P = statistic_EP.mean(dim=0)
        distance_E = (statistic_EP - mean_P).square().sum(dim=1)
        mean_norm = mean_P.square().sum()
        E = statistic_EP.shape[0]
        pairs = [(a, b) for a in range(E) for b in range(a + 1, E)]
        for e in range(E):
            metrics[f"{name}_distance/domain_{e}"] = distance_E[e].item()
            metrics[f"{name}_relative_distance/domain_{e}"] = (
                (distance_E[e] / mean_norm).item() if mean_norm > 0 else math.nan
            )
        if pairs:
            pairwise = torch.stack([(statistic_EP[a] - statistic_EP[b]).square().sum() for a, b in pairs])
            metrics[f"{name}_pairwise_distance"] = pairwise.mean().item()
    cosine_E = nn.functional.cosine_similarity(hessian_EP.double(), grad_variance_EP.double(), dim=1)
    for e in range(hessian_EP.shape[0]):
        metrics[f"cosine_hessian_grad_variance/domain_{e}"] = cosine_E[e].item()
    return metrics


class HessianAlignmentCallback(Callback):
    """Logs how far apart the training domains' head Hessians and gradient variances are (Fishr, Table 1, Fig. 3).

    Args:
        every_n_steps: compute on the training batch of every ``n``-th optimizer step (default 100),
            from step 0. Each computation costs one BackPACK backward per domain through a copy of the
            head: negligible next to a training step.
        head: attribute path of the final ``nn.Linear`` (default ``None``: found as ``FishrCallback``
            finds it: ``classifier``, ``fc``, ``head``, ``linear``, or the only ``nn.Linear``).
        loss: ``"cross_entropy"`` (default) or ``"bce_with_logits"`` (one-logit heads): the loss whose
            Hessian and gradients are measured. BackPACK's ``DiagHessian`` knows only these losses.
        num_domains: number of training domains (default ``None``: ``max id + 1`` of the first batch
            measured). Each measured batch must hold at least 2 samples of every domain.
        targets_and_domains: ``batch -> (targets, domain_ids)`` for batch layouts other than
            ``(x, y, domain)`` tuples or mappings with keys ``y`` and ``domain``.
        plot_filename: PNG written into ``trainer.log_dir`` (else ``default_root_dir``) when training
            ends (default ``"hessian_alignment.png"``; ``None``: no plot). Absolute paths are kept.
        log_prefix: prefix of the logged names (default ``"hessian_alignment/"``).

    Under distributed training each rank measures its own local batch; rank 0's values are logged.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        head: str | None = None,
        loss: LossName = "cross_entropy",
        num_domains: int | None = None,
        targets_and_domains: heads.TargetsAndDomains | None = None,
        plot_filename: str | None = "hessian_alignment.png",
        log_prefix: str = "hessian_alignment/",
    ) -> None:
        if every_n_steps < 1:
            raise FishrInputError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if loss not in ("cross_entropy", "bce_with_logits"):
            raise FishrInputError(
                f"HessianAlignmentCallback measures 'cross_entropy' or 'bce_with_logits' losses (the losses "
                f"BackPACK's DiagHessian supports), got {loss!r}."
            )
        self.every_n_steps = every_n_steps
        self.head = head
        self.loss: LossName = loss
        self.num_domains = num_domains
        self.targets_and_domains = targets_and_domains or heads.default_targets_and_domains
        self.plot_filename = plot_filename
        self.log_prefix = log_prefix
        self.history: list[dict[str, float]] = []
        self._head_module: nn.Linear | None = None
        self._hook: RemovableHandle | None = None
        self._due_step: int | None = None
        self._last_measured_step: int | None = None
        self._captured: tuple[Tensor, Tensor, Tensor | None] | None = None

    # -- set-up and tear-down -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.head, self._head_module = heads.resolve_head(pl_module, self.head)
        self._hook = self._head_module.register_forward_hook(self._record_head_input)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- per step -------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 and step != self._last_measured_step
        self._due_step = step if due else None
        self._captured = None

    def _record_head_input(self, module: nn.Linear, args: tuple[Any, ...], output: Tensor) -> None:
        # The head's parameters as they are at this forward (the optimizer step comes before
        # on_train_batch_end), so the statistics describe the weights that produced this loss.
        if self._due_step is not None and self._captured is None:
            bias = None if module.bias is None else module.bias.detach().clone()
            self._captured = (args[0].detach(), module.weight.detach().clone(), bias)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due_step is None:
            return
        step, self._due_step = self._due_step, None
        if self._captured is None:
            raise FishrInputError(
                f"HessianAlignmentCallback: the head {self.head!r} did not run in training_step at step {step}. "
                "Name the final nn.Linear that maps the features to the logits with head=..."
            )
        features_ND, weight, bias = self._captured
        self._captured = None
        targets, domains_N = self.targets_and_domains(batch)
        if features_ND.dim() != 2 or features_ND.shape[0] != domains_N.shape[0]:
            raise FishrInputError(
                f"HessianAlignmentCallback: the head's input has shape {tuple(features_ND.shape)} but the batch "
                f"has {domains_N.shape[0]} domain ids. It needs one [N, D] forward of the head over the whole "
                "batch in training_step; name the right head with head=..."
            )
        domains_N = domains_N.to(features_ND.device)
        targets = targets.to(features_ND.device)
        if self.num_domains is None:
            self.num_domains = int(domains_N.max()) + 1
        FF.check_domain_counts(FF.domain_onehot(domains_N, self.num_domains, torch.float32).sum(dim=0))
        head_copy = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device)
        with torch.no_grad():
            head_copy.weight.copy_(weight)
            if bias is not None:
                head_copy.bias.copy_(bias)
        hessian_EP = head_hessian_diagonals(head_copy, features_ND, targets, domains_N, self.num_domains, self.loss)
        variance_EP = head_gradient_variances(head_copy, features_ND, targets, domains_N, self.num_domains, self.loss)
        metrics = alignment_metrics(hessian_EP, variance_EP)
        self._last_measured_step = step
        self.history.append({"step": float(step), **metrics})
        self._log(trainer, {self.log_prefix + name: value for name, value in metrics.items()}, step)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        # Straight to the loggers, at the measured step, as LearningRateMonitor does: through
        # self.log a value logged at step k reaches them only when k is a multiple of
        # Trainer(log_every_n_steps), which would drop most measurements.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot_filename is not None and self.history:
            path = Path(self.plot_filename)
            if not path.is_absolute():
                path = Path(trainer.log_dir or trainer.default_root_dir) / path
            self._plot_on_rank_zero(path)

    @rank_zero_only
    def _plot_on_rank_zero(self, path: Path) -> None:
        self.plot(path)

    # -- the plot -------------------------------------------------------------------------------

    def plot(self, path: str | Path) -> Path:
        """Write the history as a PNG: per statistic, each domain's relative distance to the mean
        (log scale) against the step, and the cosine between ``diag H_e`` and ``Var G_e``."""
        if not self.history:
            raise FishrInputError("No measurement yet: train for at least one step before plotting.")
        import matplotlib

        matplotlib.use("Agg")  # no display needed; safe in worker processes
        import matplotlib.pyplot as plt

        steps = [row["step"] for row in self.history]
        domains = sorted(
            {key.rsplit("_", 1)[1] for key in self.history[0] if key.startswith("hessian_distance/")}, key=int
        )
        figure, axes = plt.subplots(1, 3, figsize=(15, 4))
        titles = {
            "hessian": r"Hessian diagonal: $\|h_e-\bar h\|^2/\|\bar h\|^2$",
            "grad_variance": r"Gradient variance: $\|v_e-\bar v\|^2/\|\bar v\|^2$",
        }
        for axis, statistic in zip(axes[:2], STATISTICS):
            for e in domains:  # dashes tell domains apart where curves coincide (two domains: always)
                values = [row[f"{statistic}_relative_distance/domain_{e}"] for row in self.history]
                axis.plot(steps, values, marker=".", linestyle=LINESTYLES[int(e) % 4], label=f"domain {e}")
            if all(v > 0 for row in self.history for k, v in row.items() if k.startswith(f"{statistic}_relative")):
                axis.set_yscale("log")
            axis.set_title(titles[statistic])
        for e in domains:
            axes[2].plot(
                steps,
                [row[f"cosine_hessian_grad_variance/domain_{e}"] for row in self.history],
                marker=".",
                label=f"domain {e}",
            )
        axes[2].set_title(r"$\cos(\mathrm{diag}\,H_e, \mathrm{Var}\,G_e)$")
        for axis in axes:
            axis.set_xlabel("step")
            axis.legend()
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_measured_step": self._last_measured_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_measured_step = state_dict.get("last_measured_step")
