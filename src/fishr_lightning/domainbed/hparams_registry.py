"""DomainBed's hyperparameter registry (``domainbed/hparams_registry.py``): every algorithm's defaults and
random-search distributions, per dataset.

``hparams_seed == 0`` gives the defaults; any other seed a draw from the random-search
distributions. Each hyperparameter draws from its own ``RandomState``, seeded by a hash of
``(seed_hash(hparams_seed, trial_seed), name)``, so adding an algorithm or a hyperparameter never
changes another one's draws (DomainBed issue #169) and ERM and Fishr share their ``lr``,
``batch_size``... draws for the same seeds: paired comparisons. The scheme is DomainBed's, so a
draw here equals DomainBed's for the same names and seeds. NumPy only (``fishr-collect`` imports no torch);
the app's random-search overrides (``hparams_search``) are ``fishr_lightning.app.training.hparams``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fishr_lightning.domainbed.names import DOMAINBED_ALGORITHMS
from fishr_lightning.seeds import seed_hash

# DomainBed's small-image datasets (the embedded synthetic one counts as small: an MLP on vectors).
SMALL_IMAGE_DATASETS = ("Debug28", "RotatedMNIST", "ColoredMNIST", "Synthetic")

Sampler = Callable[[np.random.RandomState], Any]

# DomainBed's names of the algorithms with registered hyperparameters.
ALGORITHMS = DOMAINBED_ALGORITHMS  # all 34, each with its block below (issues 26, 27)

# The Fishr paper's ablations that are options outside DomainBed's registry (issue 26): off unless given
# as +hparams.<name>=..., then recorded with the run's hyperparameters; never drawn, so the registry's
# defaults and draws stay DomainBed's. vrex_ema: "V-REx with EMA" (Tables 9-10), VRExCallback(ema=...).
# IGA's (Tables 11-12): iga_classifier_only (the classifier's gradients, not the whole network's), iga_ema (an EMA
# of each domain's gradient), iga_fishr_lambda/_penalty_anneal_iters/_ema (Fishr + IGA); see domainbed/iga.py.
ABLATION_HPARAMS = {
    "vrex_ema": 0.0,
    "iga_classifier_only": False,
    "iga_ema": 0.0,
    "iga_fishr_lambda": 0.0,
    "iga_fishr_penalty_anneal_iters": 0,
    "iga_fishr_ema": 0.95,
}


# DomainBed's protocols (issue 27): "classic", its registry's common keys when the Fishr paper ran it (the
# torchvision ResNet-50, BatchNorm frozen: the published tables); "2024", since its ERM++ release (July 2024),
# which adds these keys: timm's resnet50.ram_in1k (resnet50_augmix), BatchNorm trained (freeze_bn=False), the
# ViT/DINOv2/LARS switches off. Each name draws from its own RandomState, so the others' draws are the same.
PROTOCOLS = ("classic", "2024")
PROTOCOL_2024_HPARAMS: dict[str, tuple[Any, Sampler]] = {
    "resnet50_augmix": (True, lambda r: True),
    "dinov2": (False, lambda r: False),
    "vit": (False, lambda r: False),
    "vit_attn_tune": (False, lambda r: False),
    "freeze_bn": (False, lambda r: False),
    "lars": (False, lambda r: False),
    "linear_steps": (500, lambda r: 500),
    "vit_dropout": (0.0, lambda r: float(r.choice([0.0, 0.1, 0.5]))),
}


def registry(algorithm: str, dataset: str, protocol: str = "classic") -> dict[str, tuple[Any, Sampler]]:
    """Each hyperparameter's ``(default, random-search sampler)`` for this algorithm, dataset and protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: DomainBed's protocols are {', '.join(PROTOCOLS)}.")
    small = dataset in SMALL_IMAGE_DATASETS
    hparams: dict[str, tuple[Any, Sampler]] = {
        "data_augmentation": (True, lambda r: True),
        "resnet18": (False, lambda r: False),
        "resnet_dropout": (0.0, lambda r: float(r.choice([0.0, 0.1, 0.5]))),
        "class_balanced": (False, lambda r: False),
        "nonlinear_classifier": (False, lambda r: bool(r.choice([False, False]))),
    }
    if protocol == "2024":
        hparams.update(PROTOCOL_2024_HPARAMS)
    if algorithm in ("DANN", "CDANN"):
        hparams["lambda"] = (1.0, lambda r: float(10 ** r.uniform(-2, 2)))
        hparams["weight_decay_d"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
        hparams["d_steps_per_g_step"] = (1, lambda r: int(2 ** r.uniform(0, 3)))
        hparams["grad_penalty"] = (0.0, lambda r: float(10 ** r.uniform(-2, 1)))
        hparams["beta1"] = (0.5, lambda r: float(r.choice([0.0, 0.5])))
        hparams["mlp_width"] = (256, lambda r: int(2 ** r.uniform(6, 10)))
        hparams["mlp_depth"] = (3, lambda r: int(r.choice([3, 4, 5])))
        hparams["mlp_dropout"] = (0.0, lambda r: float(r.choice([0.0, 0.1, 0.5])))
    elif algorithm == "SagNet":
        hparams["sag_w_adv"] = (0.1, lambda r: float(10 ** r.uniform(-2, 1)))
    elif algorithm == "SelfReg":
        pass  # DomainBed's registry has no SelfReg entry: the common ones only
    elif algorithm == "RDM":  # DomainBed's RDM block: per-dataset weights, anneal and its own Adam's lr
        if dataset == "DomainNet":
            hparams["rdm_lambda"] = (0.5, lambda r: float(r.uniform(0.1, 1.0)))
        elif dataset in ("PACS", "TerraIncognita"):
            hparams["rdm_lambda"] = (5.0, lambda r: float(r.uniform(1.0, 10.0)))
        else:
            hparams["rdm_lambda"] = (5.0, lambda r: float(r.uniform(0.1, 10.0)))
        if dataset == "DomainNet":
            hparams["rdm_penalty_anneal_iters"] = (2400, lambda r: int(r.uniform(1500, 3000)))
        else:
            hparams["rdm_penalty_anneal_iters"] = (1500, lambda r: int(r.uniform(800, 2700)))
        if dataset in ("TerraIncognita", "OfficeHome", "DomainNet"):
            hparams["variance_weight"] = (0.0, lambda r: float(r.choice([0.0])))
        else:
            hparams["variance_weight"] = (0.004, lambda r: float(r.uniform(0.001, 0.007)))
        hparams["rdm_lr"] = (1.5e-5, lambda r: float(r.uniform(8e-6, 2e-5)))
    elif algorithm == "Fishr":
        # Rame et al. 2022, Appendix D / DomainBed's registry. The synthetic default trains for
        # 1500 steps in all: its warm-up is shorter than DomainBed's 1500 (the paper's Colored
        # MNIST script warms up for 190 steps).
        hparams["lambda"] = (1000.0, lambda r: float(10 ** r.uniform(1.0, 4.0)))
        warmup = 300 if dataset == "Synthetic" else 1500
        hparams["penalty_anneal_iters"] = (warmup, lambda r: int(r.uniform(0.0, 5000.0)))
        hparams["ema"] = (0.95, lambda r: float(r.uniform(0.90, 0.99)))
    elif algorithm == "IRM":
        hparams["irm_lambda"] = (1e2, lambda r: float(10 ** r.uniform(-1, 5)))
        hparams["irm_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm == "VREx":
        hparams["vrex_lambda"] = (1e1, lambda r: float(10 ** r.uniform(-1, 5)))
        hparams["vrex_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm in ("CORAL", "MMD", "CausIRL_CORAL", "CausIRL_MMD"):
        hparams["mmd_gamma"] = (1.0, lambda r: float(10 ** r.uniform(-1, 1)))
    elif algorithm == "GroupDRO":
        hparams["groupdro_eta"] = (1e-2, lambda r: float(10 ** r.uniform(-3, -1)))
    elif algorithm == "Mixup":
        hparams["mixup_alpha"] = (0.2, lambda r: float(10 ** r.uniform(-1, 1)))
    elif algorithm == "SD":
        hparams["sd_reg"] = (0.1, lambda r: float(10 ** r.uniform(-5, -1)))
    elif algorithm == "TRM":
        hparams["cos_lambda"] = (1e-4, lambda r: float(10 ** r.uniform(-5, 0)))
        hparams["iters"] = (200, lambda r: int(10 ** r.uniform(0, 4)))
        hparams["groupdro_eta"] = (1e-2, lambda r: float(10 ** r.uniform(-3, -1)))
    elif algorithm in ("IB_ERM", "IB_IRM"):  # DomainBed's registry; IB_IRM's IRM keys first, as there
        if algorithm == "IB_IRM":
            hparams["irm_lambda"] = (1e2, lambda r: float(10 ** r.uniform(-1, 5)))
            hparams["irm_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
        hparams["ib_lambda"] = (1e2, lambda r: float(10 ** r.uniform(-1, 5)))
        hparams["ib_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm in ("CAD", "CondCAD"):
        hparams["lmbda"] = (1e-1, lambda r: float(r.choice([1e-4, 1e-3, 1e-2, 1e-1, 1, 1e1, 1e2])))
        hparams["temperature"] = (0.1, lambda r: float(r.choice([0.05, 0.1])))
        hparams["is_normalized"] = (False, lambda r: False)
        hparams["is_project"] = (False, lambda r: False)
        hparams["is_flipped"] = (True, lambda r: True)
    elif algorithm == "Transfer":  # weight_decay_d and beta1 are registered but Transfer reads neither (DomainBed's)
        hparams["t_lambda"] = (1.0, lambda r: float(10 ** r.uniform(-2, 1)))
        hparams["delta"] = (2.0, lambda r: float(r.uniform(0.1, 3.0)))
        hparams["d_steps_per_g"] = (10, lambda r: int(r.choice([1, 2, 5])))
        hparams["weight_decay_d"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
        hparams["gda"] = (False, lambda r: True)  # every random draw sets gda (DomainBed's registry)
        hparams["beta1"] = (0.5, lambda r: float(r.choice([0.0, 0.5])))
        hparams["lr_d"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
    elif algorithm == "EQRM":  # burn-in drawn as a float, as DomainBed's registry draws it
        hparams["eqrm_quantile"] = (0.75, lambda r: float(r.uniform(0.5, 0.99)))
        hparams["eqrm_burnin_iters"] = (2500, lambda r: float(10 ** r.uniform(2.5, 3.5)))
        hparams["eqrm_lr"] = (1e-6, lambda r: float(10 ** r.uniform(-7, -5)))
    elif algorithm == "ERMPlusPlus":
        hparams["linear_lr"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
        if protocol == "classic":  # ERM++ is DomainBed's since 2024: its common keys, BatchNorm frozen as classic
            hparams.update({name: PROTOCOL_2024_HPARAMS[name] for name in ("lars", "linear_steps")})
            hparams["freeze_bn"] = (True, lambda r: True)
    elif algorithm == "URM":
        hparams["urm"] = ("adversarial", lambda r: str(r.choice(["adversarial"])))
        hparams["urm_adv_lambda"] = (0.1, lambda r: float(r.uniform(0, 0.2)))
        hparams["urm_discriminator_label_smoothing"] = (0, lambda r: float(r.uniform(0, 0)))
        hparams["urm_discriminator_optimizer"] = ("adam", lambda r: str(r.choice(["adam"])))
        hparams["urm_discriminator_hidden_layers"] = (1, lambda r: int(r.choice([1, 2, 3])))
        hparams["urm_generator_output"] = ("tanh", lambda r: str(r.choice(["tanh", "relu"])))
        if small:
            hparams["urm_discriminator_lr"] = (1e-3, lambda r: float(10 ** r.uniform(-5.5, -3.5)))
        else:
            hparams["urm_discriminator_lr"] = (5e-5, lambda r: float(10 ** r.uniform(-6, -4.5)))
    elif algorithm == "ADRMX":
        hparams["cnt_lambda"] = (1.0, lambda r: float(r.choice([1.0])))
        hparams["dclf_lambda"] = (1.0, lambda r: float(r.choice([1.0])))
        hparams["disc_lambda"] = (0.75, lambda r: float(r.choice([0.75])))
        hparams["rmxd_lambda"] = (1.0, lambda r: float(r.choice([1.0])))
        hparams["d_steps_per_g_step"] = (2, lambda r: int(r.choice([2])))
        hparams["beta1"] = (0.5, lambda r: float(r.choice([0.5])))
        hparams["mlp_width"] = (256, lambda r: int(r.choice([256])))
        hparams["mlp_depth"] = (9, lambda r: int(r.choice([8, 9, 10])))
        hparams["mlp_dropout"] = (0.0, lambda r: float(r.choice([0])))
    elif algorithm == "RSC":
        hparams["rsc_f_drop_factor"] = (1 / 3, lambda r: float(r.uniform(0, 0.5)))
        hparams["rsc_b_drop_factor"] = (1 / 3, lambda r: float(r.uniform(0, 0.5)))
    elif algorithm == "ANDMask":
        hparams["tau"] = (1, lambda r: float(r.uniform(0.5, 1.0)))
    elif algorithm == "IGA":
        hparams["penalty"] = (1000, lambda r: float(10 ** r.uniform(1, 5)))
    elif algorithm == "SANDMask":
        hparams["tau"] = (1.0, lambda r: float(r.uniform(0.0, 1.0)))
        hparams["k"] = (1e1, lambda r: float(10 ** r.uniform(-3, 5)))
    elif algorithm == "Fish":
        hparams["meta_lr"] = (0.5, lambda r: float(r.choice([0.05, 0.1, 0.5])))
    elif algorithm == "MLDG":
        hparams["mldg_beta"] = (1.0, lambda r: float(10 ** r.uniform(-1, 1)))
        hparams["n_meta_test"] = (2, lambda r: int(r.choice([1, 2])))
    elif algorithm == "MTL":
        hparams["mtl_ema"] = (0.99, lambda r: float(r.choice([0.5, 0.9, 0.99, 1.0])))
    elif algorithm not in ALGORITHMS:
        raise ValueError(f"No hyperparameters registered for algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)}).")

    if small:
        hparams["lr"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
        hparams["weight_decay"] = (0.0, lambda r: 0.0)
        hparams["batch_size"] = (64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        hparams["lr"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
        hparams["weight_decay"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
        if algorithm == "ARM":  # DomainBed: ARM's support sets are its batches, 8 outside the small images
            hparams["batch_size"] = (8, lambda r: 8)
        elif algorithm == "RDM":  # DomainBed's rule, before its DomainNet one
            if dataset in ("DomainNet", "TerraIncognita"):
                hparams["batch_size"] = (40, lambda r: int(r.uniform(30, 60)))
            else:
                hparams["batch_size"] = (88, lambda r: int(r.uniform(70, 100)))
        elif dataset == "DomainNet":
            hparams["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, 5)))
        else:
            hparams["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, 5.5)))
    if algorithm == "ADRMX":  # DomainBed's own learning-rate grid for ADRMX
        if small:
            hparams["lr"] = (3e-3, lambda r: float(r.choice([5e-4, 1e-3, 2e-3, 3e-3])))
        else:
            hparams["lr"] = (3e-5, lambda r: float(r.choice([2e-5, 3e-5, 4e-5, 5e-5])))
    if algorithm in ("DANN", "CDANN"):  # DomainBed's generator and discriminator learning rates, after batch_size
        if small:
            hparams["lr_g"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
            hparams["lr_d"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
            hparams["weight_decay_g"] = (0.0, lambda r: 0.0)
        else:
            hparams["lr_g"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
            hparams["lr_d"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
            hparams["weight_decay_g"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
    return hparams


def default_hparams(algorithm: str, dataset: str, protocol: str = "classic") -> dict[str, Any]:
    """DomainBed's default hyperparameters (``hparams_registry.default_hparams``) for the protocol."""
    return {name: default for name, (default, _) in registry(algorithm, dataset, protocol).items()}


def random_hparams(
    algorithm: str, dataset: str, seed: int, samplers: dict[str, Sampler] | None = None, protocol: str = "classic"
) -> dict[str, Any]:
    """A random-search draw; ``samplers`` replace the registry's for some names (``search_space``, issue 26)."""
    samplers = samplers or {}
    return {
        name: samplers.get(name, sampler)(np.random.RandomState(seed_hash(seed, name)))
        for name, (_, sampler) in registry(algorithm, dataset, protocol).items()
    }


def hparams_for(
    algorithm: str,
    dataset: str,
    hparams_seed: int,
    trial_seed: int,
    samplers: dict[str, Sampler] | None = None,
    protocol: str = "classic",
) -> dict[str, Any]:
    """The run's hyperparameters: defaults for ``hparams_seed == 0``, else a random-search draw
    seeded by ``(hparams_seed, trial_seed)`` exactly as DomainBed's ``train.py`` seeds it. The defaults
    stay DomainBed's whatever ``samplers`` say: as in DomainBed, a default is not part of the distribution."""
    if hparams_seed == 0:
        return default_hparams(algorithm, dataset, protocol)
    return random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed), samplers, protocol)
