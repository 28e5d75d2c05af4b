"""``python train.py`` / ``fishr-train``: one DomainBed run (dataset, algorithm, test domains, seeds)
as a Hydra app over Lightning. The configs are ``configs/`` at the repository root, installed as
``fishr_lightning.app.configs``.

A run directory holds ``results.jsonl`` (DomainBed's records), ``checkpoints/last.ckpt`` while it
runs (for resuming; removed once finished), the final model as ``save_model`` says (``model.pt``,
the weights: default; ``model.ckpt``, a full resumable checkpoint; or nothing) and ``done`` once
finished. One process at a time runs in a directory (``.lock``); a run whose directory holds its
checkpoint resumes from it (``ckpt_path: auto``), one that holds ``done`` with the same settings is
skipped, so a re-launched or requeued sweep only trains what is missing (``run_directory.py``). A
preemption signal saves the step reached and exits non-zero (``preemption.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from fishr_lightning import FishrInputError
from fishr_lightning.app import AppError
from fishr_lightning.app.data.datamodule import DomainBedDataModule, check_batch_divides
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.image_folders import check_decode, check_finish, check_pipeline, use_input_config
from fishr_lightning.app.data.images import TRUNCATED_IMAGES_ENV
from fishr_lightning.app.data.specs import check_test_envs, dataset_spec, holds_tensors
from fishr_lightning.app.reporting.records import AVERAGED_FILE, DONE_FILE, read_records
from fishr_lightning.app.reporting.results import RecordWriter
from fishr_lightning.app.seeding import DOMAINBED_SEED, domainbed_sweep_seed
from fishr_lightning.app.training.averaging import AveragedModelRecord, averaging_callbacks, stopped_early
from fishr_lightning.app.training.config_checks import check_top_level_keys
from fishr_lightning.app.training.console import app_error_of, app_warnings, quiet_lightning, sweep_directory
from fishr_lightning.app.training.distributed_batchnorm import check_distributed_batchnorm, sync_batchnorm_choice
from fishr_lightning.app.training.evaluation import DomainBedEvaluation
from fishr_lightning.app.training.hparams import (
    ABLATION_HPARAMS,
    ALGORITHMS,
    SearchSpaceError,
    hparams_for,
    recorded_search_space,
    registry,
    search_space,
)
from fishr_lightning.app.training.initialisation import (
    BEST_WEIGHTS_FILE,
    INIT_FILE,
    BestModel,
    FrozenFeaturizer,
    check_init_options,
    init_args,
    init_path,
    load_init,
    model_contents,
)
from fishr_lightning.app.training.loggers import finish_loggers, instantiate_logger
from fishr_lightning.app.training.module import DomainClassifier
from fishr_lightning.app.training.preemption import Preempted, Preemption
from fishr_lightning.app.training.progress import ProgressLines
from fishr_lightning.app.training.run_directory import (
    FINISHED,
    RESUME_CHECKPOINT,
    check_checkpoint,
    check_ckpt_path_option,
    check_same_images,
    resume_decision,
    run_directory_lock,
)
from fishr_lightning.app.training.warmups import warn_about_warmups
from fishr_lightning.domainbed import DomainBedError, build_algorithm
from fishr_lightning.domainbed.hparams_registry import PROTOCOLS

CONFIG_MODULE = "fishr_lightning.app.configs"
SAVE_MODEL_CHOICES = ("weights", "full", "none", "best")
WEIGHTS_FILE = "model.pt"
FULL_CHECKPOINT_FILE = "model.ckpt"


def run_directory(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")  # a config composed without Hydra's runtime (hydra.compose)


# DomainBed's registry entries that the app records but does not act on, and what to do instead.
RECORDED_ONLY_HPARAMS = {
    "resnet18": "choose the backbone with backbone=resnet18",
    "class_balanced": "the app draws each domain's batch uniformly, DomainBed's default",
    "nonlinear_classifier": "the app's head is linear, where Fishr's penalty applies",
}


def run_protocol(cfg: DictConfig) -> str:
    """``protocol``: ``classic`` (the Fishr paper's DomainBed) or ``2024`` (DomainBed's since July 2024; issue 27)."""
    protocol = str(cfg.get("protocol", "classic"))
    if protocol not in PROTOCOLS:
        raise AppError(
            f"protocol={protocol}: DomainBed's protocols are classic (the published tables: torchvision's ResNet-50, "
            "BatchNorm frozen) and 2024 (DomainBed since its ERM++ release: timm's resnet50.ram_in1k, BatchNorm trained)."
        )
    return protocol


def apply_protocol(cfg: DictConfig) -> None:
    """``protocol=2024``: the dataset's classic ResNet-50 becomes DomainBed's 2024 backbone (``resnet50_augmix``:
    timm's ``resnet50.ram_in1k``, BatchNorm trained), as DomainBed's ``networks.ResNet`` with the 2024 registry;
    a backbone chosen on the command line (``backbone=...``) stays, and ``backbone.<option>=...`` overrides carry
    over where the 2024 backbone has the option (issue 27). The registry's 2024 keys come with ``resolve_hparams``."""
    if run_protocol(cfg) != "2024" or config_choice("backbone") != "resnet50" or not HydraConfig.initialized():
        return
    overrides = [override.lstrip("+~") for override in HydraConfig.get().overrides.task]
    if any(override.split("=")[0].split("@")[0] == "backbone" for override in overrides):
        return  # backbone=resnet50 said explicitly
    node = OmegaConf.load(str(resources.files(CONFIG_MODULE) / "backbone" / "resnet50_augmix.yaml"))
    for override in overrides:
        key = override.split("=")[0]
        if key.startswith("backbone."):
            option = key.removeprefix("backbone.")
            if OmegaConf.select(node, option, default=None) is None and option not in node:
                raise AppError(
                    f"{key} is an option of the classic ResNet-50; protocol=2024 trains timm's resnet50.ram_in1k "
                    f"(configs/backbone/resnet50_augmix.yaml), whose options are {', '.join(node)}. Drop it, or keep "
                    "the classic backbone with backbone=resnet50."
                )
            OmegaConf.update(node, option, OmegaConf.select(cfg, key), force_add=True)
    with open_dict(cfg):
        cfg.backbone = node


def resolve_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The registry's hyperparameters for this run, then the user's: ``batch_size`` and ``hparams.*``."""
    search = run_search_space(cfg)
    samplers = {name: sampler for name, (_, sampler) in search.items()}
    protocol = run_protocol(cfg)
    hparams = hparams_for(cfg.algorithm.name, cfg.dataset.name, cfg.hparams_seed, cfg.trial_seed, samplers, protocol)
    if cfg.batch_size is not None:
        hparams["batch_size"] = cfg.batch_size
    overrides = OmegaConf.to_container(cfg.hparams, resolve=True)
    # Any algorithm's names are accepted (one sweep may set lambda for ERM and Fishr alike, as DomainBed's
    # --hparams does); a misspelt +hparams.lamda=100 would otherwise change nothing, silently.
    known = {name for algorithm in ALGORITHMS for name in registry(algorithm, cfg.dataset.name, protocol)}
    known |= set(ABLATION_HPARAMS)
    for name, value in overrides.items():
        if name not in known:
            raise AppError(
                f"hparams.{name} is not a hyperparameter of the registry; on {cfg.dataset.name} they are "
                f"{', '.join(sorted(known))} (e.g. +hparams.lr=1e-4)."
            )
        if RECORDED_ONLY_HPARAMS.get(name) and value != hparams[name]:
            raise AppError(f"hparams.{name}={value} is not supported: {RECORDED_ONLY_HPARAMS[name]}.")
    hparams.update(overrides)
    hparams["resnet18"] = cfg.backbone.get("depth") == 18 and "ResNet" in cfg.backbone._target_
    if protocol == "2024":  # what the backbone is, as resnet18 says it (DomainBed's networks.ResNet reads them)
        hparams["resnet50_augmix"] = cfg.backbone.get("name") == "resnet50.ram_in1k"
        freeze = cfg.backbone.get("freeze_bn", cfg.backbone.get("freeze_batchnorm"))
        if freeze is not None:
            hparams["freeze_bn"] = bool(freeze)
    return hparams


def run_search_space(cfg: DictConfig) -> dict[str, Any]:
    """The ``hparams_search`` distributions that apply to this run's algorithm, checked (issue 26)."""
    search = cfg.get("hparams_search") or {}
    search = OmegaConf.to_container(search, resolve=True) if OmegaConf.is_config(search) else dict(search)
    try:
        return search_space(search, cfg.algorithm.name, cfg.dataset.name)
    except SearchSpaceError as error:
        raise AppError(str(error)) from None


def instantiate_callbacks(nodes: DictConfig) -> list[Callback]:
    """Every ``name: {_target_: ...}`` entry of a callbacks node (entries set to null are skipped)."""
    callbacks = []
    for name, node in nodes.items():
        if node is None:
            continue
        if "_target_" not in node:
            raise AppError(f"callbacks.{name} has no _target_: every callback entry is {{_target_: class, ...args}}.")
        callbacks.append(instantiate(node))
    return callbacks


def config_choice(group: str) -> str | None:
    """The option chosen for a config group (``resnet50``), when Hydra runs the app."""
    if not HydraConfig.initialized():
        return None
    choices = HydraConfig.get().runtime.choices
    # Datasets choose their backbone in their own defaults list, under the key backbone@_global_.backbone.
    return next((choice for key, choice in choices.items() if key.split("@")[0] == group), None)


def run_args(cfg: DictConfig, run_dir: Path, test_envs: list[int]) -> dict[str, Any]:
    """DomainBed's ``args`` record (what its collect_results.py groups by), plus the app's choices."""
    pipeline, decode, finish = data_options(cfg)
    if holds_tensors(cfg.dataset.name):
        pipeline = "tensors"  # MNIST and the synthetic dataset are tensors: no image pipeline runs
    return {
        "dataset": cfg.dataset.name,
        "algorithm": cfg.algorithm.name,
        "test_envs": test_envs,
        "hparams_seed": cfg.hparams_seed,
        "trial_seed": cfg.trial_seed,
        "seed": cfg.seed,
        "data_dir": str(cfg.data_dir),
        "holdout_fraction": cfg.holdout_fraction,
        "steps": cfg.steps,
        "checkpoint_freq": cfg.checkpoint_freq,
        "output_dir": str(run_dir),
        "task": "domain_generalization",
        "uda_holdout_fraction": 0,
        "backbone": config_choice("backbone") or cfg.backbone._target_.rsplit(".", 1)[-1],
        "ckpt_path": cfg.ckpt_path,
        "eval_augmentation": cfg.eval_augmentation,
        "save_model": cfg.save_model,
        "data_pipeline": pipeline,  # fast, domainbed, or tensors
        **({"data_decode": decode, "data_finish": finish} if pipeline == "fast" else {}),
        "protocol": run_protocol(cfg),  # classic or 2024 (issue 27): fishr-collect keeps them apart
        "precision": str(cfg.trainer.get("precision", "32-true")),  # fishr-collect keys its cells on it (issue 25)
        # Recorded only when set, so the runs recorded before issue 26 keep their args (and their cells).
        **({"hparams_search": recorded_search_space(search)} if (search := run_search_space(cfg)) else {}),
        **init_args(cfg),  # init, init_from, init_sha256: only when set (issue 29)
    }


def data_options(cfg: DictConfig) -> tuple[str, str, str]:
    """``(data.pipeline, data.decode, data.finish)``, checked."""
    data = cfg.get("data") or {}
    pipeline = check_pipeline(data.get("pipeline", "fast"))
    decode = check_decode(data.get("decode", "cpu"), pipeline)
    return pipeline, decode, check_finish(data.get("finish", "auto"), pipeline, decode)


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """One run; returns its last record, or ``None`` when the run directory says ``done``."""
    run_dir = run_directory(cfg)
    spec = dataset_spec(cfg.dataset.name, cfg.data_dir)  # dataset=image_folders: its domains are data_dir's
    test_envs = check_test_envs(
        OmegaConf.to_container(cfg.test_envs) if OmegaConf.is_list(cfg.test_envs) else cfg.test_envs, spec
    )
    check_run_options(cfg)
    with open_dict(cfg):
        cfg.ckpt_path = check_ckpt_path_option(cfg.ckpt_path)
        if cfg.seed == DOMAINBED_SEED:  # the domainbed* sweep presets: DomainBed's sweep.py seed (issue 19)
            cfg.seed = domainbed_sweep_seed(spec.name, cfg.algorithm.name, test_envs, cfg.hparams_seed, cfg.trial_seed)
    pipeline, decode, finish = data_options(cfg)
    apply_protocol(cfg)
    hparams = resolve_hparams(cfg)
    if not is_positive_int(hparams["batch_size"]):
        raise AppError(f"batch_size={hparams['batch_size']}: it is the number of samples per training domain and step.")
    ckpt_path = resume_decision(run_dir, cfg.ckpt_path, run_args(cfg, run_dir, test_envs), hparams)
    if ckpt_path == FINISHED:
        print(
            f"{run_dir} holds a finished run ({DONE_FILE}); skipping it (its recorded args and hparams are this "
            f"command's). Delete {run_dir / DONE_FILE} to train again."
        )
        if sweep_directory() is not None:
            print(sweep_hint(sweep_directory()))
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[TRUNCATED_IMAGES_ENV] = str(run_dir / ".truncated_images")  # one warning per file and run

    with open_dict(cfg):
        cfg.hparams = hparams
        cfg.num_train_domains = len(spec.environments) - len(test_envs)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    data = load_domains(
        spec.name,
        cfg.data_dir,
        image_size=cfg.dataset.image_size or 224,
        augment=hparams["data_augmentation"],
        seed=cfg.seed,  # DomainBed builds Colored/Rotated MNIST after seeding its global RNG with args.seed
        samples_per_domain=cfg.dataset.get("samples_per_domain"),
        skip_broken_images=cfg.data.skip_broken_images,
        pipeline=pipeline,
        decode=decode,
        finish=finish,
    )
    if ckpt_path is not None:
        check_same_images(run_dir, len(data.skipped_images))
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    # The algorithm's own module options (configs/algorithm/*.yaml `module:`): Mixup, one forward per domain.
    module_node = cfg.algorithm.get("module")
    module_options = OmegaConf.to_container(module_node, resolve=True) if module_node is not None else {}
    domainbed = domainbed_options(cfg)
    module = build_module(backbone, data.input_shape, spec.num_classes, hparams, module_options, domainbed)
    if cfg.get("init_from") is not None:  # a shared initialisation (DiWA, issue 29); a resumed run's checkpoint wins
        load_init(module, init_path(cfg), backbone, data.input_shape, spec.num_classes, cfg.algorithm.name)
    if cfg.get("init") == "random":  # DiWA's random initialisation: the untrained weights, no training
        args = {**run_args(cfg, run_dir, test_envs), "steps": 0}
        record = {"step": None, "hparams": hparams, "args": args}
        torch.save(model_contents(module, backbone, data.input_shape, spec.num_classes, record), run_dir / INIT_FILE)
        print(
            f"fishr-train: the initialisation (random weights) is {run_dir / INIT_FILE}; "
            f"start a sweep from it with init_from={run_dir / INIT_FILE}"
        )
        return record
    input_config = getattr(module.featurizer, "input_config", None)
    if input_config:  # timm backbones: their own input size, mean and std in the transforms
        use_input_config(data, input_config, augment=hparams["data_augmentation"])
    datamodule = DomainBedDataModule(
        data,
        test_envs=test_envs,
        holdout_fraction=cfg.holdout_fraction,
        trial_seed=cfg.trial_seed,
        seed=cfg.seed,
        batch_size=hparams["batch_size"],
        steps=cfg.steps,
        eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers,
        pin_memory=torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu"
        if cfg.loader.pin_memory is None
        else cfg.loader.pin_memory,
        persistent_workers=cfg.loader.persistent_workers,
        eval_augmentation=cfg.eval_augmentation,
    )

    progress_bar = cfg.trainer.get("enable_progress_bar")
    if progress_bar is None:
        progress_bar = sys.stdout.isatty()
    evaluation = DomainBedEvaluation(
        datamodule,
        RecordWriter(run_dir, hparams=hparams, args=run_args(cfg, run_dir, test_envs)),
        steps=cfg.steps,
        checkpoint_freq=cfg.checkpoint_freq,
        steps_per_epoch=datamodule.steps_per_epoch,
        resume_checkpoint=run_dir / RESUME_CHECKPOINT,
    )
    averaging = averaging_callbacks(cfg, datamodule, evaluation, run_dir)
    # The full checkpoint's on_train_end runs before the averaging callbacks put the averaged weights
    # in the module: it holds the raw training weights and optimizer state (resumable, issue 18).
    final_checkpoint = [FinalCheckpoint(run_dir / FULL_CHECKPOINT_FILE)] if cfg.save_model == "full" else []
    callbacks = [*instantiate_callbacks(cfg.algorithm.callbacks), *final_checkpoint, *averaging, evaluation]
    if cfg.save_model == "best":  # after the evaluation: it reads the step's record (issue 29)
        best = BestModel(
            evaluation, run_dir / BEST_WEIGHTS_FILE, test_envs, backbone, data.input_shape, spec.num_classes
        )
        callbacks.append(best)
    if cfg.get("init") == "linear_probe":
        callbacks.append(FrozenFeaturizer())
    if not progress_bar and cfg.progress.every:
        callbacks.append(ProgressLines(every=cfg.progress.every, steps=cfg.steps))
    callbacks += instantiate_callbacks(cfg.callbacks)
    warn_about_warmups(callbacks, cfg.steps, cfg.checkpoint_freq, hparams, cfg.algorithm.name, spec.name)
    callbacks.append(Preemption(run_dir / RESUME_CHECKPOINT))  # last: after the step's record
    trainer = instantiate_trainer(
        cfg.trainer,
        max_steps=cfg.steps,
        max_epochs=-1,
        limit_val_batches=0,  # evaluation is DomainBedEvaluation's, on DomainBed's steps
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # DomainBatchSampler draws each rank's share itself
        enable_checkpointing=False,  # DomainBedEvaluation saves the resume checkpoint after each record
        enable_progress_bar=progress_bar,
        callbacks=callbacks,
        logger=instantiate_logger(cfg.logger, run_dir),
        default_root_dir=str(run_dir),
        # Under DDP a training BatchNorm normalises over every process's share, as one process (issue 25).
        sync_batchnorm=sync_batchnorm_choice(module.featurizer, cfg.trainer.get("sync_batchnorm")),
    )
    check_batch_divides(hparams["batch_size"], trainer.world_size)
    check_distributed_batchnorm(trainer, module.featurizer)
    if trainer.accumulate_grad_batches != 1:
        raise AppError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported: DomainBed's step "
            "(and Fishr's penalty) is one update over the whole batch of every training domain, which Lightning's "
            "micro-batches would split. Raise batch_size (per domain and step) or use more devices instead."
        )
    evaluation.writer.args["world_size"] = trainer.world_size  # the processes that shared each step's batch
    evaluation.writer.args["skipped_images"] = len(data.skipped_images)  # data.skip_broken_images=true
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, module)
    (run_dir / DONE_FILE).unlink(missing_ok=True)  # an explicit ckpt_path continues a finished run
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer)  # W&B: the next run of a sweep gets its own run (issue 30)

    records = read_records(run_dir)
    # The last record, not trainer.global_step: that stays 0 in the main process of ddp_spawn.
    finished = bool(records) and (records[-1]["step"] == cfg.steps - 1 or stopped_early(averaging))
    averaged = next((cb.record for cb in averaging if isinstance(cb, AveragedModelRecord)), None)
    # With averaging, model.pt holds the averaged weights also when model.ckpt holds the raw ones (full).
    weights = cfg.save_model in ("weights", "best") or (cfg.save_model == "full" and cfg.averaging.name is not None)
    save_model(trainer, module, run_dir, weights, backbone, data.input_shape, spec.num_classes, records)
    if cfg.get("init") == "linear_probe" and trainer.is_global_zero:
        save_model(trainer, module, run_dir, True, backbone, data.input_shape, spec.num_classes, records, INIT_FILE)
    if trainer.is_global_zero:
        if finished:
            (run_dir / DONE_FILE).write_text("done")
            shutil.rmtree(run_dir / RESUME_CHECKPOINT.parent, ignore_errors=True)  # a finished run needs no resume
        if records:
            print(summary(records[-1], spec.environments, test_envs, cfg.algorithm.name, sweep_directory()))
        if averaged:
            accuracy = ", ".join(f"{100 * averaged[f'env{env}_in_acc']:.1f}%" for env in test_envs)
            print(
                f"{averaged['args']['algorithm']} (averaged weights, in {AVERAGED_FILE}): test-domain accuracy {accuracy}."
            )
        if cfg.get("init") == "linear_probe":
            print(
                f"fishr-train: the initialisation (linear probe, {cfg.steps} steps) is {run_dir / INIT_FILE}; "
                f"start a sweep from it with init_from={run_dir / INIT_FILE}"
            )
    return records[-1] if records else None


def domainbed_options(cfg: DictConfig) -> dict[str, Any] | None:
    """For the algorithms ``fishr_lightning.domainbed.build_algorithm`` builds (``domainbed: true`` in their
    config, issue 26): its name, the training domains and the seed of the update's draws."""
    if not cfg.algorithm.get("domainbed"):
        return None
    return {"name": cfg.algorithm.name, "num_domains": int(cfg.num_train_domains), "seed": int(cfg.seed)}


def build_module(
    backbone: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    hparams: dict[str, Any],
    module_options: dict[str, Any] | None = None,
    domainbed: dict[str, Any] | None = None,
):
    """The run's module: DomainBed's algorithm ``domainbed["name"]`` (``build_algorithm``) with the app's
    backbone as its featurizer, or ``DomainClassifier`` (ERM, and the algorithms of head callbacks)."""
    backbone = dict(backbone)
    dropout = backbone.pop("dropout", 0.0)
    if domainbed is not None:
        return build_domainbed_module(backbone, dropout, input_shape, num_classes, hparams, domainbed)
    featurizer = instantiate(backbone, input_shape=input_shape)
    return DomainClassifier(
        featurizer,
        num_classes=num_classes,
        dropout=dropout,
        lr=hparams["lr"],
        weight_decay=hparams["weight_decay"],
        **(module_options or {}),
    )


def build_domainbed_module(
    backbone: dict[str, Any],
    dropout: float,
    input_shape: tuple[int, ...],
    num_classes: int,
    hparams: dict[str, Any],
    domainbed: dict[str, Any],
):
    def featurizer(shape: tuple[int, ...], _: dict[str, Any]) -> torch.nn.Module:
        network = instantiate(backbone, input_shape=shape)  # ARM asks for its context channel: its own shape
        if dropout:  # on the features, as DomainBed's ResNet; a parameter-free submodule: DomainBed's keys stay
            network.add_module("features_dropout", torch.nn.Dropout(dropout))
            network.register_forward_hook(lambda module, args, features: module.features_dropout(features))
        return network

    try:
        return build_algorithm(
            domainbed["name"],
            input_shape,
            num_classes,
            domainbed["num_domains"],
            hparams,
            featurizer,
            domainbed["seed"],
        )
    except DomainBedError as error:
        raise AppError(str(error)) from None


def save_model(
    trainer: pl.Trainer,
    module: DomainClassifier,
    run_dir: Path,
    weights: bool,
    backbone: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    records: list[dict[str, Any]],
    file_name: str = WEIGHTS_FILE,
) -> None:
    """With ``weights``, ``model.pt``: the module's weights (the averaged ones with averaging) and what
    rebuilds it (``load_model``), as DomainBed's ``model.pkl``. (``save_model=full``'s ``model.ckpt`` is
    written during the fit, by ``FinalCheckpoint``.) ``init.pt`` and ``model_best.pt`` have its format."""
    if weights and trainer.is_global_zero:
        last = records[-1] if records else {}
        torch.save(model_contents(module, backbone, input_shape, num_classes, last), run_dir / file_name)


class FinalCheckpoint(Callback):
    """``save_model=full``: the full checkpoint (``model.ckpt``: the raw training weights, optimizer
    state, Fishr's EMA, the callbacks' state; resumable with ``ckpt_path=``) at the end of training.

    Saved in ``on_train_end`` by a callback placed before the averaging callbacks, so that it holds
    the weights training reached, not the average they then put in the module (with EMA, Lightning's
    ``EMAWeightAveraging`` stores its average as the checkpoint's ``state_dict`` and the training
    weights as ``current_model_state``, and restores both on resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # on every rank (it ends in a barrier)


def load_model(path: str | Path) -> DomainClassifier:
    """The trained module from a run's ``model.pt`` (``save_model=weights``), ``model_best.pt``
    (``save_model=best``) or ``init.pt`` (``init=...``), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    backbone = dict(saved["backbone"])
    if "pretrained" in backbone:
        backbone["pretrained"] = False  # the weights come from the file
    module = build_module(
        backbone, tuple(saved["input_shape"]), saved["num_classes"], saved["hparams"], domainbed=saved.get("domainbed")
    )
    module.load_state_dict(saved["state_dict"])
    return module.eval()


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_run_options(cfg: DictConfig) -> None:
    """``steps``, ``checkpoint_freq``, ``holdout_fraction`` and ``ckpt_path`` usable, or a clear error."""
    for key in ("steps", "checkpoint_freq"):
        if not is_positive_int(cfg[key]):
            raise AppError(f"{key}={cfg[key]}: it is a number of optimizer steps, a positive integer (e.g. {key}=300).")
    if cfg.save_model not in SAVE_MODEL_CHOICES:
        raise AppError(
            f"save_model={cfg.save_model}: choose weights (model.pt, the default), full (model.ckpt, resumable), "
            "best (model.pt and model_best.pt, the weights at the best training-domain validation accuracy) or none."
        )
    if cfg.save_model == "best" and cfg.holdout_fraction == 0:
        raise AppError(
            "save_model=best keeps the weights at the best training-domain validation accuracy, which needs held-out "
            "splits: holdout_fraction=0 leaves none. Set holdout_fraction>0 (0.2 is DomainBed's)."
        )
    check_init_options(cfg)  # issue 29
    if not isinstance(cfg.data.skip_broken_images, bool):
        raise AppError(f"data.skip_broken_images={cfg.data.skip_broken_images}: true or false (the default).")
    if not isinstance(cfg.eval_augmentation, bool):
        raise AppError(f"eval_augmentation={cfg.eval_augmentation}: true (DomainBed's evaluation) or false.")
    every = cfg.progress.every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise AppError(f"progress.every={every}: the steps between progress lines, a non-negative integer (0: none).")
    holdout_fraction = cfg.holdout_fraction
    if (
        isinstance(holdout_fraction, bool)
        or not isinstance(holdout_fraction, (int, float))
        or not (0.0 <= holdout_fraction < 1.0)
    ):
        raise AppError(f"holdout_fraction={holdout_fraction}: it is the share of each domain held out, in [0, 1).")
    seed = cfg.seed
    if seed != DOMAINBED_SEED and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise AppError(
            f"seed={seed}: a non-negative integer (initialisation, batches, the MNIST variants' construction), "
            f"or {DOMAINBED_SEED} for DomainBed's sweep seed, seed_hash(dataset, algorithm, test_envs, "
            "hparams_seed, trial_seed)."
        )


def instantiate_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    try:
        return instantiate(trainer_cfg, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, MisconfigurationException):  # e.g. trainer=gpu without a GPU
            raise AppError(
                f"The trainer config cannot run on this machine: {error.__cause__} "
                "Choose another one (trainer=cpu, trainer=gpu, trainer=ddp) or change its devices/accelerator."
            ) from None
        raise


def summary(
    record: dict[str, Any],
    environments: tuple[str, ...],
    test_envs: list[int],
    algorithm: str,
    sweep_dir: str | None = None,
) -> str:
    """The per-domain table, the test-domain accuracy in words, and the baseline command; in a sweep
    (``sweep_dir``), the accuracy and the command that tabulates the sweep (issue 30)."""
    test = ", ".join(f"{environments[env]} {format_accuracy(record.get(f'env{env}_in_acc'))}" for env in test_envs)
    accuracy = f"{algorithm}: test-domain accuracy {test} (the test domains' in split, as DomainBed reports)."
    if sweep_dir is not None:  # the run's records table is above; fishr-collect compares the runs
        return f"{accuracy}\n{sweep_hint(sweep_dir)}"
    lines = [summary_table(record, environments, test_envs), accuracy]
    if algorithm != "ERM":
        lines.append(
            "Baseline: the same command with algorithm=erm; a sweep of both: python train.py -m +sweep=tiny, "
            "then fishr-collect sweeps/tiny."
        )
    return "\n".join(lines)


def sweep_hint(sweep_dir: str) -> str:
    return f"The sweep's tables, once all its runs have finished: fishr-collect {sweep_dir}"


def summary_table(record: dict[str, Any], environments: tuple[str, ...], test_envs: list[int]) -> str:
    lines = [f"Accuracy at step {record['step']} (in: training or test split; out: held-out split)"]
    lines.append(f"  {'domain':<18}{'role':<8}{'in':>8}{'out':>8}")
    for env, name in enumerate(environments):
        role = "test" if env in test_envs else "train"
        in_acc, out_acc = record.get(f"env{env}_in_acc"), record.get(f"env{env}_out_acc")
        lines.append(f"  {f'{env}: {name}':<18}{role:<8}{format_accuracy(in_acc):>8}{format_accuracy(out_acc):>8}")
    return "\n".join(lines)


def format_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def worker_message(error: Exception) -> str:
    """The message of an app error, also when a DataLoader worker raised it: PyTorch re-raises it in
    the main process with the worker's traceback as the message; its last paragraph is the error's."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
        return message[message.rindex(marker) + len(marker) :].strip()
    return message


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = run_directory(cfg)
    print(f"fishr-train: run directory {run_dir}", flush=True)  # the first line of every run names its directory
    outcome = "failed"
    quiet_lightning()
    try:
        check_top_level_keys(cfg)
        with run_directory_lock(run_dir), app_warnings():
            outcome = "finished" if train(cfg) is not None else "skipped"
    except (AppError, FishrInputError) as error:
        print(f"error: {worker_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except InstantiationException as error:  # an app error inside a config's _target_ (a backbone's weights)
        if app_error_of(error) is None:
            raise
        print(f"error: {worker_message(app_error_of(error))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as preempted:
        outcome = "preempted, not finished"
        print(f"fishr-train: {preempted}", file=sys.stderr, flush=True)
        preempted.hand_over()
    except SIGTERMException:  # Lightning's (a SystemExit with status 0): a SIGTERM that Preemption did not see
        outcome = "preempted, not finished"
        sys.exit(128 + signal.SIGTERM)
    finally:
        print(f"fishr-train: run directory {run_dir} ({outcome})", flush=True)  # and its last line


def main() -> None:
    """The console script ``fishr-train``, and ``python train.py``."""
    register_sweeper()
    hydra_main()


def register_sweeper() -> None:
    """``hydra/sweeper: fishr`` (train.yaml): Hydra finds plugins by scanning ``hydra_plugins``, which misses
    the one of an editable install (setuptools' finder lists no modules), so the app names it (issue 30)."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # first: its scan re-executes the modules it finds, BasicSweeper's included
    try:
        from hydra_plugins.fishr_lightning_sweeper.fishr_sweeper import FishrSweeper
    except ModuleNotFoundError:  # an editable install made before the package existed; single runs need no sweeper
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            print(
                "error: the app's sweeper (hydra_plugins.fishr_lightning_sweeper) is not installed: run "
                "`pip install -e .` again in the repository.",
                file=sys.stderr,
            )
            sys.exit(2)
        return
    plugins.register(FishrSweeper)


if __name__ == "__main__":
    main()
