"""Fishr's maths in pure torch: the per-domain variance of a linear head's per-sample gradients.

Rame, Dancette & Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution
Generalization", ICML 2022, Eq. 4-6; the default semantics are DomainBed's ``Fishr`` (see
``shared/DESIGN.md``). No Lightning import here: this module is the specification the rest wraps.

Shapes in names: ``N`` samples, ``D`` features, ``C`` logits, ``E`` domains, ``P`` head parameters
(``C*D`` weights, then ``C`` biases when the head has a bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
LossName = Literal["cross_entropy", "bce_with_logits"]
Reduction = Literal["mean", "sum"]


class FishrInputError(ValueError):
    """Input Fishr cannot compute a correct penalty from; the message says what to change."""


@dataclass
class HeadGradientMoments:
    """Per-domain sums of the head's per-sample gradients and of their squares.

    Sums (not means) so that data-parallel ranks can add theirs before the variance is formed.
    """

    grad_sum_EP: Tensor
    grad_sq_sum_EP: Tensor
    count_E: Tensor
    # All samples seen, including ids outside [0, E) (which add to no domain); summed over ranks too.
    num_samples: Tensor | None = None

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.grad_sum_EP, self.grad_sq_sum_EP, self.count_E


def per_sample_loss(logits_NC: Tensor, targets: Tensor, loss: LossName | PerSampleLoss) -> Tensor:
    """Each sample's own loss ``ℓ_i`` (reduction none), shape ``[N]``."""
    if callable(loss):
        return loss(logits_NC, targets)
    if loss == "cross_entropy":
        return F.cross_entropy(logits_NC, targets, reduction="none")
    if loss == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(
            logits_NC, targets.reshape(logits_NC.shape).to(logits_NC.dtype), reduction="none"
        ).sum(dim=1)
    raise FishrInputError(f"Unknown loss {loss!r}: use 'cross_entropy', 'bce_with_logits' or a callable.")


def logit_gradients(logits_NC: Tensor, targets: Tensor, loss: LossName | PerSampleLoss = "cross_entropy") -> Tensor:
    """``δ_i = ∂ℓ_i/∂s_i``, shape ``[N, C]``, kept in the autograd graph.

    The two built-in losses use their closed forms (``softmax(s) - target`` and
    ``sigmoid(s) - y``); a callable goes through one ``autograd.grad(Σ ℓ_i, s, create_graph=True)``,
    which is exact whenever ``ℓ_i`` depends on sample ``i`` alone.
    """
    if loss == "cross_entropy":
        if targets.dim() == 2:  # class probabilities (soft labels, mixup)
            return logits_NC.softmax(dim=1) - targets.to(logits_NC.dtype)
        # Not F.one_hot: on CUDA it synchronises with the host to check the largest class id.
        onehot_NC = (targets[:, None] == torch.arange(logits_NC.shape[1], device=targets.device)).to(logits_NC.dtype)
        return logits_NC.softmax(dim=1) - onehot_NC
    if loss == "bce_with_logits":
        return logits_NC.sigmoid() - targets.reshape(logits_NC.shape).to(logits_NC.dtype)
    if not logits_NC.requires_grad:  # a no-grad context (warm-up): gradients of a detached copy
        with torch.enable_grad():
            logits_NC = logits_NC.detach().requires_grad_(True)
            loss_N = per_sample_loss(logits_NC, targets, loss)
            return torch.autograd.grad(loss_N.sum(), logits_NC)[0]
    loss_N = per_sample_loss(logits_NC, targets, loss)
    return torch.autograd.grad(loss_N.sum(), logits_NC, create_graph=True)[0]


def domain_indicator(domains_N: Tensor, num_domains: int, dtype: torch.dtype) -> Tensor:
    """``[N, E]`` indicator of each sample's domain, without a host synchronisation.

    A sample whose id is outside ``[0, E)`` gets a zero row; ``FishrPenalty`` detects it from the
    counts (``count_E.sum() < N``) and ``check_domain_ids`` names it.
    """
    if domains_N.dtype.is_floating_point or domains_N.dtype == torch.bool:
        raise FishrInputError(
            f"Domain ids must be an integer tensor, got dtype {domains_N.dtype}. "
            "Pass each sample's training-domain index (0 .. num_domains-1) as a long tensor."
        )
    domain_ids_E = torch.arange(num_domains, device=domains_N.device)
    return (domains_N[:, None] == domain_ids_E).to(dtype)


def check_domain_ids(domains_N: Tensor, num_domains: int, owner: str | None = None) -> None:
    """Refuse ids outside ``[0, E)`` (one host synchronisation); ``owner`` (a callback's name) heads the message."""
    low, high = int(domains_N.min()), int(domains_N.max())
    if low < 0 or high >= num_domains:
        raise FishrInputError(
            f"{f'{owner}: d' if owner else 'D'}omain id {low if low < 0 else high} is outside [0, {num_domains}) "
            f"for num_domains={num_domains}. "
            "Domain ids must index the training domains 0 .. num_domains-1: re-number them "
            "(e.g. skip the test domains) or pass the right num_domains."
        )


def domain_onehot(domains_N: Tensor, num_domains: int, dtype: torch.dtype) -> Tensor:
    """``[N, E]`` indicator of each sample's domain; refuses ids outside ``[0, E)``."""
    onehot_NE = domain_indicator(domains_N, num_domains, dtype)
    check_domain_ids(domains_N, num_domains)
    return onehot_NE


def closed_form_moments(
    features_ND: Tensor, delta_NC: Tensor, domains_N: Tensor, num_domains: int, bias: bool = True
) -> HeadGradientMoments:
    """Per-domain moments of ``g_i = (δ_i z_iᵀ, δ_i)`` without materialising any ``g_i``.

    ``Σ_{i∈e} g_i² = Σ_{i∈e} δ_i² z_i²ᵀ`` and ``Σ_{i∈e} g_i = Σ_{i∈e} δ_i z_iᵀ`` are each one matmul
    of a domain-masked ``[N, E·C]`` copy of ``δ`` with ``z`` (DESIGN.md, "the identity that makes it
    nearly free"): ``O(N·E·C·D)`` flops and a few ``[E, C, D]`` tensors instead of ``[N, C, D]``.
    Samples with ids outside ``[0, E)`` add nothing (see ``domain_indicator``).
    """
    N, C = delta_NC.shape
    onehot_NE = domain_indicator(domains_N, num_domains, delta_NC.dtype)
    domain_delta_NEC = onehot_NE[:, :, None] * delta_NC[:, None, :]
    domain_delta_NX = domain_delta_NEC.reshape(N, num_domains * C)
    weight_sum_EP = (domain_delta_NX.T @ features_ND).reshape(num_domains, -1)
    weight_sq_sum_EP = (domain_delta_NX.square().T @ features_ND.square()).reshape(num_domains, -1)
    if bias:
        weight_sum_EP = torch.cat([weight_sum_EP, onehot_NE.T @ delta_NC], dim=1)
        weight_sq_sum_EP = torch.cat([weight_sq_sum_EP, onehot_NE.T @ delta_NC.square()], dim=1)
    num_samples = torch.tensor(N, dtype=delta_NC.dtype, device=delta_NC.device)
    return HeadGradientMoments(weight_sum_EP, weight_sq_sum_EP, onehot_NE.sum(dim=0), num_samples)


def per_sample_moments(grads_NP: Tensor, domains_N: Tensor, num_domains: int) -> HeadGradientMoments:
    """Per-domain moments from materialised per-sample gradients ``[N, P]`` (the BackPACK route)."""
    onehot_NE = domain_indicator(domains_N, num_domains, grads_NP.dtype)
    num_samples = torch.tensor(grads_NP.shape[0], dtype=grads_NP.dtype, device=grads_NP.device)
    return HeadGradientMoments(
        onehot_NE.T @ grads_NP, onehot_NE.T @ grads_NP.square(), onehot_NE.sum(dim=0), num_samples
    )


def backpack_per_sample_gradients(
    head: nn.Linear, features_ND: Tensor, targets: Tensor, loss: LossName | PerSampleLoss
) -> Tensor:
    """Per-sample gradients ``[N, P]`` of the head from BackPACK's ``BatchGrad`` (the paper's route).

    ``head`` must be wrapped by ``backpack.extend``. It runs its own forward of the head: logits
    seen by a forward hook predate the wrapping that full backward hooks (BackPACK's) need. The
    backward runs through ``torch.autograd.grad`` so that no ``.grad`` of the model is touched, and
    it names ``features_ND`` among its inputs: with the head's parameters alone BackPACK ≥ 1.4
    leaves ``grad_batch`` empty (BackPACK issue #233).

    A head in another dtype than the features (under ``16-true``/``bf16-true`` the head is half
    precision and the features come promoted to float32, as the closed form computes) runs as
    ``linear_in_dtype``'s twin in the features' dtype: the gradients are the closed form's, in float32,
    and the graph still reaches the head's own parameters (issue 25).
    """
    from backpack import backpack
    from backpack.extensions import BatchGrad

    if head.weight.dtype != features_ND.dtype:
        head = linear_in_dtype(head, features_ND.dtype)
    params = [p for p in (head.weight, head.bias) if p is not None]
    inputs = params + ([features_ND] if features_ND.requires_grad else [])
    loss_N = per_sample_loss(head(features_ND), targets, loss)
    with backpack(BatchGrad()):
        torch.autograd.grad(loss_N.sum(), inputs, retain_graph=True, create_graph=torch.is_grad_enabled())
    try:
        grads_NP = torch.cat([p.grad_batch.reshape(p.grad_batch.shape[0], -1) for p in params], dim=1)
    except AttributeError as error:
        raise FishrInputError(
            "BackPACK produced no per-sample gradients for the head. Wrap the head with "
            "`backpack.extend(head)`, or use backend='closed_form'."
        ) from error
    finally:
        for p in params:
            if hasattr(p, "grad_batch"):
                del p.grad_batch
    return grads_NP


def linear_in_dtype(head: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """A BackPACK-extended ``nn.Linear`` whose weight and bias are ``head``'s cast to ``dtype``: plain
    tensors, not parameters, so that the casts stay in the graph (a gradient through the twin reaches
    ``head``'s parameters) and BackPACK stores ``grad_batch`` on them."""
    from backpack import extend

    twin = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    for name in ("weight", "bias"):
        value = getattr(head, name)
        if value is not None:
            delattr(twin, name)  # a registered parameter would refuse a non-leaf tensor
            setattr(twin, name, value.to(dtype))
    return extend(twin)


def check_domain_counts(count_E: Tensor | list[float], min_samples: int = 2) -> None:
    """Refuse a domain with fewer than ``min_samples`` samples: its variance would be 0 or undefined."""
    counts = [round(n) for n in (count_E.detach().tolist() if isinstance(count_E, Tensor) else count_E)]
    short = [e for e, n in enumerate(counts) if n < min_samples]
    if short:
        raise FishrInputError(
            f"Training domain(s) {short} have {[counts[e] for e in short]} sample(s) in this batch "
            f"(counts per domain: {counts}); Fishr needs at least {min_samples} samples of every "
            "training domain in every batch to compare their gradient variances. Draw each batch "
            "with samples of every domain (one loader per domain, or the per-domain balanced sampler "
            "fishr_lightning.DomainBatchSampler as the DataLoader's batch_sampler), "
            "or pass num_domains equal to the number of domains that really occur."
        )


def domain_gradient_variance(moments: HeadGradientMoments, centered: bool = True) -> Tensor:
    """``v_e``: each domain's (biased) variance of per-sample head gradients, ``[E, P]``.

    ``centered=False`` gives the uncentred second moment ``mean_i g_i²`` (paper, Table 6).
    """
    grad_sum_EP, grad_sq_sum_EP, count_E = moments.as_tuple()
    second_moment_EP = grad_sq_sum_EP / count_E[:, None]
    if not centered:
        return second_moment_EP
    mean_EP = grad_sum_EP / count_E[:, None]
    return torch.addcmul(second_moment_EP, mean_EP, mean_EP, value=-1.0)  # E[g²] − E[g]², one [E, P] temporary less


def ema_update(previous_EP: Tensor | None, variance_EP: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """DomainBed's ``MovingAverage`` with the (1 - γ) correction.

    ``m_e = γ·m_e^prev + (1-γ)·v_e`` (``m^prev = 0`` at the first update). Returns the new state,
    detached, and ``m_e / (1-γ)`` for the penalty, so the gradient through ``v_e`` does not depend
    on γ. ``decay=0`` is no averaging.
    """
    if previous_EP is None:
        average_EP = (1.0 - decay) * variance_EP
    else:  # γ·m + (1-γ)·v as one op: no [E, P] temporaries while the activations are at their peak
        average_EP = torch.lerp(previous_EP.to(variance_EP), variance_EP, 1.0 - decay)
    return average_EP.detach(), average_EP / (1.0 - decay)


def gradient_variance_distance(
    variance_EP: Tensor, param_reduction: Reduction = "mean", domain_reduction: Reduction = "mean"
) -> Tensor:
    """``P = reduce_e reduce_p (v_e - v̄)²`` with ``v̄ = mean_e v_e`` (not detached).

    DomainBed: mean over parameters, mean over domains. The paper's Colored MNIST script: sums.
    """
    mean_variance_P = variance_EP.mean(dim=0)
    squared_gap_EP = (variance_EP - mean_variance_P).square()
    per_domain_E = squared_gap_EP.mean(dim=1) if param_reduction == "mean" else squared_gap_EP.sum(dim=1)
    return per_domain_E.mean() if domain_reduction == "mean" else per_domain_E.sum()


def closed_form_per_sample_gradients(features_ND: Tensor, delta_NC: Tensor, bias: bool = True) -> Tensor:
    """The head's per-sample gradients ``g_i = (vec(δ_i z_iᵀ), δ_i)`` materialised, ``[N, C·D (+ C)]``.

    Same layout as ``backpack_per_sample_gradients`` (weight row-major, then bias). Only for
    statistics the diagonal closed form cannot give, such as the full covariance below: it holds
    ``N·C·D`` numbers, which the diagonal route never does.
    """
    N = features_ND.shape[0]
    weight_grads_NP = (delta_NC[:, :, None] * features_ND[:, None, :]).reshape(N, -1)
    return torch.cat([weight_grads_NP, delta_NC], dim=1) if bias else weight_grads_NP


def domain_gradient_covariance(
    grads_NP: Tensor, domains_N: Tensor, num_domains: int, group_sizes: list[int], centered: bool = True
) -> list[Tensor]:
    """Each domain's (biased) covariance of per-sample gradients, one ``[E, P_g, P_g]`` per group.

    ``group_sizes`` splits the ``P`` columns into consecutive parameter groups (the head's weight
    ``C·D``, then its bias ``C``); covariances are per group, never across groups, as in the paper's
    Colored MNIST variant ``fishr_offdiagonal`` (Table 6, "full covariance"). ``centered=False``
    gives the uncentred second-moment matrix. The diagonal of each block is ``domain_gradient_variance``.
    """
    if sum(group_sizes) != grads_NP.shape[1]:
        raise FishrInputError(
            f"group_sizes {group_sizes} add up to {sum(group_sizes)}, but the gradients have "
            f"{grads_NP.shape[1]} columns: pass the sizes of the head's parameter tensors in order."
        )
    domain_onehot(domains_N, num_domains, grads_NP.dtype)  # validates the ids
    covariances: list[list[Tensor]] = [[] for _ in group_sizes]
    for e in range(num_domains):
        domain_grads_NP = grads_NP[domains_N == e]
        if centered:
            domain_grads_NP = domain_grads_NP - domain_grads_NP.mean(dim=0, keepdim=True)
        for g, grads_NG in enumerate(domain_grads_NP.split(group_sizes, dim=1)):
            covariances[g].append(grads_NG.T @ grads_NG / grads_NG.shape[0])
    return [torch.stack(per_domain, dim=0) for per_domain in covariances]


def head_gradient_grams(features_ND: Tensor, delta_NC: Tensor, bias: bool = True) -> list[Tensor]:
    """The ``N×N`` Gram matrices ``K_ij = g_iᵀg_j`` of the head's per-sample gradients, one per parameter
    group (weight, then bias), without materialising any ``g_i``.

    For a linear head ``g_i = δ_i ⊗ z_i`` (weight) and ``δ_i`` (bias), so inner products factor:
    ``⟨δ_i z_iᵀ, δ_j z_jᵀ⟩ = (δ_iᵀδ_j)(z_iᵀz_j)``: the weight's Gram is ``(ΔΔᵀ) ∘ (ZZᵀ)``, the bias's
    ``ΔΔᵀ``. ``O(N²·(C + D))`` flops, differentiable in ``z`` and (through ``δ``) in the head.
    """
    delta_gram_NN = delta_NC @ delta_NC.T
    weight_gram_NN = delta_gram_NN * (features_ND @ features_ND.T)
    return [weight_gram_NN, delta_gram_NN] if bias else [weight_gram_NN]


def per_sample_gradient_grams(grads_NP: Tensor, group_sizes: list[int]) -> list[Tensor]:
    """``head_gradient_grams`` from materialised per-sample gradients ``[N, P]`` (the BackPACK route)."""
    return [grads_NG @ grads_NG.T for grads_NG in grads_NP.split(group_sizes, dim=1)]


def full_covariance_route(
    num_samples: int, group_sizes: list[int], num_domains: int
) -> Literal["grams", "covariances"]:
    """Which exact form of the full-covariance penalty holds fewer numbers for this batch and head.

    ``"grams"`` (``full_covariance_distance``): one ``N×N`` Gram per parameter group; ``"covariances"``
    (``domain_gradient_covariance``): the ``[N, P]`` per-sample gradients and ``E`` covariances
    ``P_g×P_g`` per group. DomainNet's head (``N = 160``, ``P ≈ 7·10⁵``) needs the Grams; Colored MNIST's
    full batch (``N = 50,000``, ``P = 391``) the covariances. Both are exact, and equal.
    """
    grams = len(group_sizes) * num_samples * num_samples
    covariances = num_samples * sum(group_sizes) + num_domains * sum(size * size for size in group_sizes)
    return "grams" if grams <= covariances else "covariances"


def full_covariance_distance(
    grams_GNN: list[Tensor],
    group_sizes: list[int],
    domains_N: Tensor,
    num_domains: int,
    centered: bool = True,
    param_reduction: Reduction = "mean",
    domain_reduction: Reduction = "mean",
) -> tuple[Tensor, Tensor]:
    """Fishr's penalty with each domain's **full** gradient covariance (paper, Table 6), from ``N×N`` Grams.

    Per parameter group ``g`` of size ``P_g`` (as ``domain_gradient_covariance`` and the paper's
    Colored MNIST ``fishr_offdiagonal``: weight and bias blocks, no cross block), the statistic is
    ``S_e = Ĝ_eᵀĜ_e / (n_e·P_g)`` with ``Ĝ_e`` domain ``e``'s centred per-sample gradients
    ``[n_e, P_g]``; the penalty is ``reduce_e reduce_entries (S_e − S̄)²`` with ``S̄ = mean_e S_e``,
    i.e. ``Σ_g ‖S_e − S̄‖²_F`` per domain, divided by ``Σ_g P_g²`` for ``param_reduction="mean"``.

    Never a ``P×P`` matrix: ``‖S_e − S̄‖²_F = ⟨S_e,S_e⟩ − (2/E)Σ_f⟨S_e,S_f⟩ + (1/E²)Σ_{f,h}⟨S_f,S_h⟩`` and
    ``⟨Ĝ_eᵀĜ_e, Ĝ_fᵀĜ_f⟩_F = tr(Ĝ_eĜ_fᵀĜ_fĜ_eᵀ) = Σ_{i∈e, j∈f} K̂_ij²``, where ``K̂ = (I−B)K(I−B)`` is the
    Gram ``K`` of the gradients centred per domain (``B_ij = [d_i = d_j]/n_{d_i}``). Exact algebra; in
    float32 the expansion loses digits when the domains' covariances nearly agree, as ``E[g²] − E[g]²``
    does for the diagonal. Returns the penalty and the per-domain counts ``[E]``.
    """
    onehot_NE = domain_indicator(domains_N, num_domains, grams_GNN[0].dtype)
    count_E = onehot_NE.sum(dim=0)
    mean_weights_NE = onehot_NE / count_E  # column e averages over domain e's samples
    per_domain_E = torch.zeros(num_domains, dtype=count_E.dtype, device=count_E.device)
    for gram_NN, size in zip(grams_GNN, group_sizes):
        if centered:  # K − KB − BK + BKB with B = O·Wᵀ (symmetric), never an N×N B
            gram_means_NE = gram_NN @ mean_weights_NE
            gram_centred_right_NN = gram_NN - gram_means_NE @ onehot_NE.T  # K − KB
            gram_NN = gram_centred_right_NN - onehot_NE @ (mean_weights_NE.T @ gram_centred_right_NN)
        scale_E = 1.0 / (count_E * size)
        inner_EE = onehot_NE.T @ gram_NN.square() @ onehot_NE * scale_E[:, None] * scale_E[None, :]
        per_domain_E = per_domain_E + (
            inner_EE.diagonal() - 2.0 / num_domains * inner_EE.sum(dim=1) + inner_EE.sum() / num_domains**2
        )
    if param_reduction == "mean":
        per_domain_E = per_domain_E / sum(size * size for size in group_sizes)
    return (per_domain_E.mean() if domain_reduction == "mean" else per_domain_E.sum()), count_E
