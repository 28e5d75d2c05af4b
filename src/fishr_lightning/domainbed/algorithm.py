"""``DomainBedAlgorithm``: DomainBed's ``Algorithm`` as a LightningModule (issue 26).

A subclass reads as DomainBed's class: its networks under DomainBed's attribute names (so ``state_dict()``
has the keys of DomainBed's ``algorithm.state_dict()``), its optimizers as DomainBed's ``__init__`` builds
them (``build_optimizers``, by DomainBed's attribute names), and ``update(minibatches)`` as DomainBed's, with
three substitutions that make it a Lightning module:

- ``self.manual_backward(loss)`` for ``loss.backward()`` (Lightning's: precision, DDP);
- ``self.step("disc_opt")`` for ``self.disc_opt.step()`` and ``self.optimizer_named("disc_opt")`` for the
  optimizer itself (``zero_grad``, its ``param_groups``);
- ``self.generator()`` / ``self.random_state()`` for DomainBed's global random draws: seeded by
  ``(seed, update)`` only, so a resumed run draws what the uninterrupted one drew (torch's global generator,
  which dropout draws from, is seeded per update too).

One DomainBed update is one step of the run (``trainer.global_step``), however many optimizers it steps:
the update's first ``step`` goes through Lightning (which counts it), the others straight to the optimizer.
``steps``, records, checkpoints and schedules therefore count updates, as DomainBed's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from fishr_lightning.domainbed import networks
from fishr_lightning.schedule import reset_optimizer_states
from fishr_lightning.seeds import seed_hash

FeaturizerFactory = Callable[[tuple[int, ...], dict[str, Any]], nn.Module]
Minibatches = list[tuple[Tensor, Tensor]]


class DomainBedError(ValueError):
    """Input a DomainBed algorithm cannot use (an unknown name, a missing hyperparameter, a state dict
    that does not fit); the message says what to do."""


def split_minibatches(x: Tensor, y_N: Tensor, domain_N: Tensor) -> Minibatches:
    """DomainBed's ``minibatches``, ``[(x_e, y_e)]`` in order of domain id, from the app's batch: the
    training domains' minibatches concatenated in domain order, ``domain_N`` naming each row's domain."""
    domains = torch.unique(domain_N).tolist()
    return [(x[domain_N == domain], y_N[domain_N == domain]) for domain in domains]


class DomainBedAlgorithm(pl.LightningModule):
    """DomainBed's ``Algorithm(input_shape, num_classes, num_domains, hparams)``, trained by
    ``trainer.fit`` on batches ``(x, y, domain)``.

    Args:
        input_shape: the inputs' shape without the batch dimension, e.g. ``(3, 224, 224)``.
        num_classes: classes of the dataset.
        num_domains: training domains (the minibatches of an update).
        hparams: DomainBed's hyperparameter dict (``hparams_registry``): every key it has; keys the
            algorithm does not read are ignored. ``self.hparams`` is this dict.
        featurizer: ``(input_shape, hparams) -> nn.Module`` with ``n_outputs``, as DomainBed's
            ``networks.Featurizer``; ``None``: ``networks.Featurizer``.
        seed: every random draw of an update depends only on ``(seed, update)``.
    """

    automatic_optimization = False
    # Why the update under DDP is not one process's (each rank sees a shard of every domain's minibatch and
    # the update needs the whole of it); None where DDP equals one process (issue 26).
    ddp_refusal: ClassVar[str | None] = (
        "its update has not been checked under DDP against one process; train it on one device"
    )
    # DomainBed's behaviours this class reproduces on purpose, listed in the docs (issue 26).
    quirks: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        num_domains: int,
        hparams: dict[str, Any],
        featurizer: FeaturizerFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(dict(hparams))
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.seed = seed
        self.featurizer_factory = featurizer if featurizer is not None else networks.Featurizer
        # What rebuilds the module besides the shape, classes and hyperparameters (the app's model.pt).
        self.domainbed_build = {"name": type(self).__name__, "num_domains": num_domains, "seed": seed}
        self.update_index = 0  # updates done before the current one (trainer.global_step during a fit)
        self._optimizer_names: list[str] = []
        self._stepped_through_lightning = False

    # --- DomainBed's interface -------------------------------------------------------------------------
    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        """One DomainBed update on ``[(x_e, y_e)]``; returns DomainBed's logged values."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """DomainBed's optimizers by its attribute names (``{"optimizer": Adam(...)}``), in its order."""
        raise NotImplementedError

    def make_featurizer(self, input_shape: Sequence[int] | None = None) -> nn.Module:
        """The featurizer for ``input_shape`` (default: the module's), as DomainBed's ``networks.Featurizer``."""
        return self.featurizer_factory(tuple(input_shape or self.input_shape), dict(self.hparams))

    # --- the substitutions of update() -----------------------------------------------------------------
    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``manual_backward`` in a fit; ``loss.backward()`` when ``update`` is called by hand."""
        if self._trainer is None:
            loss.backward(*args, **kwargs)
        else:
            super().manual_backward(loss, *args, **kwargs)

    def optimizer_named(self, name: str) -> torch.optim.Optimizer:
        """DomainBed's ``self.<name>``: the torch optimizer (for ``zero_grad``, ``param_groups``, its state)."""
        if self._trainer is None:
            return self._detached_optimizers[name]
        optimizers = self.optimizers(use_pl_optimizer=False)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[self._optimizer_names.index(name)]

    def step(self, name: str) -> None:
        """DomainBed's ``self.<name>.step()``. The update's first step is Lightning's (it counts the update)."""
        if self._trainer is None:
            self._detached_optimizers[name].step()
            return
        if not self._stepped_through_lightning:
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            optimizers[self._optimizer_names.index(name)].step()
            self._stepped_through_lightning = True
            return
        if self.trainer.precision == "16-mixed":
            raise DomainBedError(
                f"{type(self).__name__} steps several optimizers in one update, which trainer.precision=16-mixed's "
                "gradient scaler cannot follow; train it with 32-true, bf16-mixed or bf16-true."
            )
        self.optimizer_named(name).step()

    def reset_optimizer(self, name: str) -> None:
        """DomainBed re-creates the optimizer (IRM, V-REx… when the penalty switches on): its state forgotten."""
        reset_optimizer_states([self.optimizer_named(name)])

    def generator(self, salt: str = "") -> torch.Generator:
        """A torch generator for this update's draws: seeded by ``(seed, update, salt)`` only."""
        return torch.Generator().manual_seed(seed_hash(self.seed, self.update_index, "torch", salt))

    def random_state(self, salt: str = "") -> np.random.RandomState:
        """A NumPy ``RandomState`` for this update's draws: seeded by ``(seed, update, salt)`` only."""
        return np.random.RandomState(seed_hash(self.seed, self.update_index, "numpy", salt))

    # --- Lightning -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = self.build_optimizers()
        self._optimizer_names = list(optimizers)
        return list(optimizers.values())

    @property
    def _detached_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Outside a Trainer (``module.update`` called by hand): DomainBed's own optimizers, built once."""
        if "_own_optimizers" not in self.__dict__:
            self.__dict__["_own_optimizers"] = self.build_optimizers()
            self._optimizer_names = list(self.__dict__["_own_optimizers"])
        return self.__dict__["_own_optimizers"]

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1 and self.ddp_refusal is not None:
            raise DomainBedError(
                f"{type(self).__name__} cannot run under DDP ({self.trainer.world_size} processes): {self.ddp_refusal}. "
                "Train it with trainer.devices=1 (one process), as DomainBed does."
            )

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        x, y_N, domain_N = batch
        self.update_index = self.trainer.global_step
        self._stepped_through_lightning = False
        # The global generator too (dropout, any draw of a user's featurizer) starts each update from (seed, update),
        # so that a resumed run draws as the uninterrupted one; forked, so the caller's stream is left as it was.
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed_hash(self.seed, self.update_index, "global"))
                values = self.update(split_minibatches(x, y_N, domain_N))
        except KeyError as error:
            name = error.args[0] if error.args else None
            if isinstance(name, str) and name not in self.hparams:
                raise DomainBedError(
                    f"{type(self).__name__} reads the hyperparameter {name!r}, which hparams lacks. Pass DomainBed's "
                    f"whole dict: fishr_lightning.domainbed.default_hparams({type(self).__name__!r}, dataset) gives it."
                ) from None
            raise
        if not self._stepped_through_lightning:
            raise RuntimeError(f"{type(self).__name__}.update stepped no optimizer through self.step(name).")
        for name, value in values.items():
            self.log(f"train/{name}", float(value), batch_size=len(y_N), prog_bar=name == "loss")
        return {"domainbed": {name: float(value) for name, value in values.items()}}

    # --- DomainBed's state dict ----------------------------------------------------------------------
    def domainbed_keys(self, state: dict[str, Tensor]) -> list[str]:
        """The keys of ``state`` (this module's ``state_dict()``) that DomainBed's class has: all by default."""
        return list(state)

    def prepare_for_domainbed_state(self, model_dict: dict[str, Tensor]) -> None:
        """Before loading DomainBed's ``model_dict``: make the networks or buffers DomainBed creates lazily
        (Fish's ``network_inner``, GroupDRO's ``q``). Nothing by default."""
