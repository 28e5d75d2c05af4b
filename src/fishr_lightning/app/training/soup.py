"""``fishr-soup SWEEP_DIR``: DiWA's weight soups (Ramé et al., NeurIPS 2022; alexrame/diwa's
``scripts/diwa.py``) over a sweep's finished runs, issue 29.

For every (dataset, test domains, algorithm, trial) group of finished runs that keep their best weights
(``model_best.pt``, ``save_model=best``) and started from one initialisation (``args.init_sha256``,
``init_from=``) with one backbone:

- ``uniform``: the average of every member's best weights;
- ``restricted``: DiWA's greedy selection: the members sorted by their own training-domain validation
  accuracy (decreasing), each added only if the soup's training-domain validation accuracy does not drop
  (``>=``, as ``diwa.py``'s ``if ood_results["train_acc"] >= best_result``).

Floating-point buffers are averaged with the weights, integer ones (``num_batches_tracked``) come from the
first member; BatchNorm layers that train get their statistics re-estimated on training batches, as SWAD's
averaged weights (``update_batchnorm_from_training``). Weights are streamed one run at a time into a float64
running sum (never every model in memory); the greedy search evaluates each candidate once.

Each soup is evaluated on every split as a run's record (``DomainBedEvaluation.accuracies``, the datamodule
built from the members' recorded args and Hydra config as ``run.py`` builds it) and written as a run of its
own, ``SWEEP_DIR/diwa/<group>-<selection>/`` (``results.jsonl``, ``done``, ``model.pt``), with
``args.algorithm`` = ``<algorithm>+DiWA(uniform)`` / ``<algorithm>+DiWA(restricted)``: ``fishr-collect``
tabulates them beside the runs. The soup directories are never members of a soup.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from fishr_lightning.app import AppError
from fishr_lightning.app.data.datamodule import DomainBedDataModule
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.image_folders import use_input_config
from fishr_lightning.app.data.specs import dataset_spec
from fishr_lightning.app.reporting.records import DONE_FILE, RESULTS_FILE, read_records
from fishr_lightning.app.training.console import quiet_lightning
from fishr_lightning.app.training.evaluation import DomainBedEvaluation
from fishr_lightning.app.training.initialisation import BEST_WEIGHTS_FILE
from fishr_lightning.app.training.run import WEIGHTS_FILE, build_module, data_options
from fishr_lightning.averaging.batchnorm_update import update_batchnorm_from_training

SOUP_DIRECTORY = "diwa"  # under the sweep directory; never searched for members
SELECTIONS = ("uniform", "restricted")
SOUP_MARK = "+DiWA("
# The members' args that the soup's record leaves out: they differ between members (seed, hparams_seed) or
# between the soups of one algorithm (init_from: one init per dataset and test domain), and fishr-collect would
# label every row of the dataset with any argument in which records of one algorithm differ.
MEMBER_ONLY_ARGS = ("seed", "init_from", "init_sha256", "save_model", "ckpt_path")


@dataclass
class Member:
    """A finished run with its best weights: its directory, args and own training-domain validation accuracy."""

    directory: Path
    args: dict[str, Any]
    hparams: dict[str, Any]
    val_acc: float
    test_acc: float = float("nan")  # at the same record: the test domains' in splits (DomainBed's test accuracy)


@dataclass
class Group:
    dataset: str
    test_envs: list[int]
    algorithm: str
    trial_seed: int
    members: list[Member] = field(default_factory=list)

    @property
    def name(self) -> str:
        envs = "_".join(str(env) for env in self.test_envs)
        return f"{self.dataset}-{self.algorithm}-test_envs{envs}-trial{self.trial_seed}"


def training_domain_validation(record: dict[str, Any]) -> float:
    """DomainBed's training-domain validation: the mean of the training domains' out-split accuracies."""
    test_envs = record["args"]["test_envs"]
    domains = sum(1 for key in record if key.startswith("env") and key.endswith("_out_acc"))
    return float(np.mean([record[f"env{env}_out_acc"] for env in range(domains) if env not in test_envs]))


def test_domain_accuracy(record: dict[str, Any]) -> float:
    return float(np.mean([record[f"env{env}_in_acc"] for env in record["args"]["test_envs"]]))


def find_members(sweep_dir: Path) -> list[Member]:
    """The finished runs under ``sweep_dir`` that hold ``model_best.pt``, soups (``diwa/``) left out."""
    members = []
    for results in sorted(sweep_dir.rglob(RESULTS_FILE)):
        directory = results.parent
        if SOUP_DIRECTORY in directory.relative_to(sweep_dir).parts:
            continue
        if not (directory / DONE_FILE).exists() or not (directory / BEST_WEIGHTS_FILE).exists():
            continue
        records = read_records(directory)
        if not records or SOUP_MARK in records[-1]["args"]["algorithm"]:
            continue
        best = max(records, key=training_domain_validation)  # the record model_best.pt holds (save_model=best)
        test_acc = test_domain_accuracy(best)
        members.append(
            Member(directory, records[-1]["args"], best["hparams"], training_domain_validation(best), test_acc)
        )
    return members


def group_members(members: Iterable[Member]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for member in members:
        args = member.args
        key = (args["dataset"], tuple(args["test_envs"]), args["algorithm"], args["trial_seed"])
        if key not in groups:
            groups[key] = Group(args["dataset"], list(args["test_envs"]), args["algorithm"], args["trial_seed"])
        groups[key].members.append(member)
    return list(groups.values())


def refusal(group: Group) -> str | None:
    """Why the group's runs cannot be averaged, or ``None``: DiWA needs one shared initialisation (weights
    fine-tuned from it stay linearly connected) and, for the average to exist, one architecture."""
    missing = [member.directory.name for member in group.members if not member.args.get("init_sha256")]
    if missing:
        return (
            f"{len(missing)} of its {len(group.members)} runs ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) "
            "record no shared initialisation (args.init_sha256): DiWA averages only runs started from one init; "
            "train them with init_from=<init.pt> (python train.py init=linear_probe ... makes one)."
        )
    inits = Counter(member.args["init_sha256"] for member in group.members)
    if len(inits) > 1:
        counts = ", ".join(f"{sha[:12]}: {count} run(s)" for sha, count in inits.most_common())
        return (
            f"its runs start from {len(inits)} different initialisations ({counts}): weights fine-tuned from "
            "different inits are not linearly connected and their average fails. Start every run of a group "
            "from the same init_from file."
        )
    backbones = Counter(str(member.args.get("backbone")) for member in group.members)
    if len(backbones) > 1:
        counts = ", ".join(f"{name}: {count} run(s)" for name, count in backbones.most_common())
        return f"its runs use different backbones ({counts}): weights of different architectures cannot be averaged."
    return None


def greedy_selection(
    candidates: Sequence[Member], soup_accuracy: Callable[[list[Member]], float]
) -> tuple[list[Member], list[dict[str, Any]]]:
    """DiWA's restricted selection (``diwa.py``): the candidates by decreasing validation accuracy (ties: by
    directory, for a stable order), each added when the soup with it scores ``>=`` the best soup so far.
    ``soup_accuracy(selected + [candidate])`` is called once per candidate. Returns the accepted members and
    one ``{run, val_acc, soup_val_acc, accepted}`` line per candidate, in order."""
    ordered = sorted(candidates, key=lambda member: (-member.val_acc, str(member.directory)))
    accepted: list[Member] = []
    history = []
    best = -float("inf")
    for member in ordered:
        accuracy = soup_accuracy([*accepted, member])
        keep = accuracy >= best
        if keep:
            accepted.append(member)
            best = accuracy
        history.append(
            {"run": str(member.directory), "val_acc": member.val_acc, "soup_val_acc": accuracy, "accepted": keep}
        )
    return accepted, history


class WeightSum:
    """A float64 running sum of state dicts, one added at a time; integer tensors kept from the first."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state_dict: dict[str, torch.Tensor], source: Path) -> None:
        if self.count and set(state_dict) != set(self.first):
            raise AppError(f"{source}'s weights have other parameter names than the first member's: another model.")
        for name, tensor in state_dict.items():
            if self.count and tensor.shape != self.first[name].shape:
                raise AppError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, the first member's "
                    f"{tuple(self.first[name].shape)}: another model, it cannot be averaged."
                )
            if not self.count:
                self.first[name] = tensor
            if tensor.is_floating_point():
                self.sums[name] = self.sums[name] + tensor.double() if name in self.sums else tensor.double()
        self.count += 1

    def copy(self) -> WeightSum:
        other = WeightSum()
        other.sums, other.first, other.count = dict(self.sums), dict(self.first), self.count
        return other

    def mean(self) -> dict[str, torch.Tensor]:
        return {
            name: (self.sums[name] / self.count).to(tensor.dtype) if name in self.sums else tensor.clone()
            for name, tensor in self.first.items()
        }


def load_best(member: Member) -> dict[str, Any]:
    return torch.load(member.directory / BEST_WEIGHTS_FILE, map_location="cpu", weights_only=True)


class SoupEvaluator:
    """The members' model and datamodule, rebuilt as ``run.py`` builds them, in a Trainer on ``device``:
    ``accuracies(state_dict)`` puts the weights in, re-estimates the statistics of BatchNorm layers that
    train, and returns a run record's ``env{i}_{in,out}_acc``."""

    def __init__(self, reference: Member, saved: dict[str, Any], device: str, bn_batches: int) -> None:
        # The best member's args and hyperparameters: the group shares dataset, test domains, trial (the splits)
        # and data options; batch_size (BatchNorm's batches) and data_augmentation (eval_augmentation's
        # transform) may differ between members, and the best one's stand for the soup.
        args, hparams = reference.args, reference.hparams
        config_path = reference.directory / ".hydra" / "config.yaml"
        if not config_path.exists():
            raise AppError(
                f"{config_path} is missing: fishr-soup rebuilds the runs' data from the config Hydra saved with "
                "each run (dataset size, loader, data pipeline). Run the members with the app (python train.py -m ...)."
            )
        cfg = OmegaConf.load(config_path)
        spec = dataset_spec(args["dataset"], args["data_dir"])
        pipeline, decode, finish = data_options(cfg)
        data = load_domains(
            spec.name,
            args["data_dir"],
            image_size=cfg.dataset.image_size or 224,
            augment=hparams["data_augmentation"],
            seed=args["seed"],
            samples_per_domain=cfg.dataset.get("samples_per_domain"),
            skip_broken_images=cfg.data.skip_broken_images,
            pipeline=pipeline,
            decode=decode,
            finish=finish,
        )
        backbone = dict(saved["backbone"])
        if "pretrained" in backbone:
            backbone["pretrained"] = False  # the weights come from the files
        self.module = build_module(
            backbone,
            tuple(saved["input_shape"]),
            saved["num_classes"],
            saved["hparams"],
            domainbed=saved.get("domainbed"),
        )
        input_config = getattr(self.module.featurizer, "input_config", None)
        if input_config:
            use_input_config(data, input_config, augment=hparams["data_augmentation"])
        self.steps = args["steps"]
        self.datamodule = DomainBedDataModule(
            data,
            test_envs=args["test_envs"],
            holdout_fraction=args["holdout_fraction"],
            trial_seed=args["trial_seed"],
            seed=args["seed"],
            batch_size=hparams["batch_size"],
            steps=self.steps,
            eval_batch_size=cfg.loader.eval_batch_size,
            num_workers=cfg.loader.num_workers,
            pin_memory=False,
            persistent_workers=cfg.loader.persistent_workers,
            eval_augmentation=args["eval_augmentation"],
        )
        accelerator = "gpu" if device == "cuda" else "cpu"
        self.trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=args.get("precision", "32-true"),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        # The module in the strategy, so that per_split_sums and the BatchNorm re-estimation send each batch
        # through the precision plugin and strategy as a run's evaluation does; the datamodule's batch hook (the
        # fast image pipeline's device part) as the module's own, through Lightning's public API only (issue 18).
        self.trainer.strategy.connect(self.module)
        self.datamodule.trainer = self.trainer
        self.module.on_after_batch_transfer = self.datamodule.on_after_batch_transfer
        self.module.to(self.trainer.strategy.root_device)
        self.evaluation = DomainBedEvaluation(self.datamodule, None, self.steps, 1, 1.0, None)
        self.bn_batches = bn_batches
        self.batchnorm_batches = 0

    def accuracies(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        self.module.load_state_dict(state_dict)
        # The steps after the last, as SWAD's averaged weights in a run (averaging.py's bn_batches).
        self.batchnorm_batches = update_batchnorm_from_training(
            self.trainer,
            self.module,
            self.bn_batches,
            batches=lambda trainer: self.datamodule.training_batches(self.steps, self.bn_batches),
            owner="fishr-soup",
        )
        return self.evaluation.accuracies(self.trainer, self.module, self.steps - 1)

    def validation(self, accuracies: dict[str, float]) -> float:
        return float(np.mean([accuracies[f"env{env}_out_acc"] for env in self.datamodule.train_envs]))


def soup_record(group: Group, selection: str, accuracies: dict[str, float], run_dir: Path, **diwa: Any) -> dict:
    first = group.members[0].args
    args = {name: value for name, value in first.items() if name not in MEMBER_ONLY_ARGS}
    args.update(
        algorithm=f"{group.algorithm}+DiWA({selection})",
        hparams_seed=0,  # one soup per cell: DomainBed's model selection has one "run" to choose
        output_dir=str(run_dir),
    )
    step = first["steps"] - 1
    diwa_info = {"selection": selection, "init_from": first.get("init_from"), "init_sha256": first.get("init_sha256")}
    return {"step": step, **accuracies, "hparams": {}, "args": args, "diwa": {**diwa_info, **diwa}}


def write_soup(run_dir: Path, record: dict[str, Any], weights: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            **{k: v for k, v in saved.items() if k != "val_acc"},
            "state_dict": weights,
            "args": record["args"],  # hparams: the best member's, which rebuild the module (load_model)
            "step": record["step"],
        },
        run_dir / WEIGHTS_FILE,
    )
    (run_dir / RESULTS_FILE).write_text(json.dumps(record, sort_keys=True) + "\n")
    (run_dir / DONE_FILE).write_text("done")


def soup_group(group: Group, sweep_dir: Path, device: str, bn_batches: int, selections: Sequence[str]) -> list[str]:
    """Writes the group's soups; returns one summary line per soup."""
    ordered = sorted(group.members, key=lambda member: (-member.val_acc, str(member.directory)))
    reference_saved = load_best(ordered[0])
    evaluator = SoupEvaluator(ordered[0], reference_saved, device, bn_batches)
    del reference_saved["state_dict"]
    lines = []
    val_mean = float(np.mean([member.val_acc for member in group.members]))
    test_mean = float(np.mean([member.test_acc for member in group.members]))

    def summary(accuracies: dict[str, float]) -> str:
        return (
            f"training-domain validation {100 * evaluator.validation(accuracies):.1f}% (best member "
            f"{100 * ordered[0].val_acc:.1f}%, members' mean {100 * val_mean:.1f}%), test domain "
            f"{100 * test_domain_accuracy({**accuracies, 'args': group.members[0].args}):.1f}% (best member's "
            f"{100 * ordered[0].test_acc:.1f}%, members' mean {100 * test_mean:.1f}%)"
        )

    if "uniform" in selections:
        total = WeightSum()
        for member in tqdm(ordered, desc=f"{group.name} uniform", unit="run", file=sys.stderr):
            total.add(load_best(member)["state_dict"], member.directory)
        weights = total.mean()
        accuracies = evaluator.accuracies(weights)
        run_dir = sweep_dir / SOUP_DIRECTORY / f"{group.name}-uniform"
        members = [str(member.directory) for member in ordered]
        record = soup_record(
            group, "uniform", accuracies, run_dir, members=members, batchnorm_batches=evaluator.batchnorm_batches
        )
        write_soup(run_dir, record, weights, reference_saved)
        lines.append(f"{group.name}: uniform soup of {len(ordered)} runs: {summary(accuracies)} -> {run_dir}")
    if "restricted" in selections:
        state = {"sum": WeightSum(), "best": None}
        bar = tqdm(total=len(ordered), desc=f"{group.name} restricted", unit="run", file=sys.stderr)

        def soup_accuracy(selected: list[Member]) -> float:
            candidate = state["sum"].copy()
            candidate.add(load_best(selected[-1])["state_dict"], selected[-1].directory)
            weights = candidate.mean()
            accuracies = evaluator.accuracies(weights)
            accuracy = evaluator.validation(accuracies)
            if state["best"] is None or accuracy >= state["best"][0]:  # greedy_selection keeps it: the same rule
                state["sum"], state["best"] = candidate, (accuracy, accuracies, weights, evaluator.batchnorm_batches)
            bar.update()
            return accuracy

        accepted, history = greedy_selection(ordered, soup_accuracy)
        bar.close()
        accuracy, accuracies, weights, batchnorm_batches = state["best"]
        run_dir = sweep_dir / SOUP_DIRECTORY / f"{group.name}-restricted"
        record = soup_record(
            group,
            "restricted",
            accuracies,
            run_dir,
            members=[str(m.directory) for m in accepted],
            candidates=history,
            batchnorm_batches=batchnorm_batches,
        )
        write_soup(run_dir, record, weights, reference_saved)
        lines.append(
            f"{group.name}: restricted soup of {len(accepted)} of {len(ordered)} runs: {summary(accuracies)} -> {run_dir}"
        )
    return lines


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AppError("--device cuda: no CUDA device is visible here; use --device cpu (or auto).")
    return device


def soup_sweep(sweep_dir: Path, device: str = "auto", bn_batches: int = 500, selections=SELECTIONS) -> int:
    """Every group's soups; prints a line per soup and per refused group. The exit status: 0 when at least
    one group was souped, 2 when none could be (no member runs, or every group refused)."""
    if not sweep_dir.is_dir():
        raise AppError(f"{sweep_dir} is not a directory: pass the sweep directory of the runs to average.")
    device = resolve_device(device)
    quiet_lightning()  # no tips nor device lines between the soups' lines
    groups = group_members(find_members(sweep_dir))
    if not groups:
        raise AppError(
            f"No finished run with {BEST_WEIGHTS_FILE} under {sweep_dir}: DiWA averages each run's best weights, "
            "which runs keep with save_model=best (and a shared init_from=...)."
        )
    souped = 0
    for group in groups:
        reason = refusal(group)
        if reason is not None:
            print(f"fishr-soup: refused {group.name}: {reason}", flush=True)
            continue
        for line in soup_group(group, sweep_dir, device, bn_batches, selections):
            print(f"fishr-soup: {line}", flush=True)
        souped += 1
    if not souped:
        print("error: no group of runs could be souped (the reasons above).", file=sys.stderr, flush=True)
        return 2
    print(f"fishr-soup: the soups are runs of their own; tabulate them beside the runs with fishr-collect {sweep_dir}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """The console script ``fishr-soup``."""
    parser = argparse.ArgumentParser(
        prog="fishr-soup",
        description="DiWA weight soups (uniform and greedy 'restricted') of a sweep's runs that share an init.",
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--bn-batches",
        type=int,
        default=500,
        help="training batches re-estimating BatchNorm statistics where BatchNorm trains (SWAD's 500)",
    )
    parser.add_argument("--selection", choices=(*SELECTIONS, "both"), default="both")
    options = parser.parse_args(argv)
    selections = SELECTIONS if options.selection == "both" else (options.selection,)
    try:
        status = soup_sweep(options.sweep_dir, options.device, options.bn_batches, selections)
    except AppError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
