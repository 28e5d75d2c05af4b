"""The maths of Fishr's comparison set, in pure torch: IRM, V-REx, CORAL, MMD, GroupDRO, SD, Mixup.

Each function computes what DomainBed's ``update()`` computes (``domainbed/algorithms.py``, and
``domainbed/lib/misc.py`` for Mixup's pairs), from one step's head inputs and outputs: features
``[N, D]``, logits ``[N, C]``, targets ``[N]`` and training-domain ids ``[N]`` in ``0 .. E-1``.
DomainBed feeds one minibatch per domain; here domain ``e``'s minibatch is the samples with id
``e``, in batch order. No Lightning import: the callbacks of ``fishr_lightning.baselines`` wrap this.

Data-parallel training: the per-domain statistics are sums, and each function that takes a
``reduce`` argument (a differentiable sum over ranks, e.g. ``distributed.differentiable_all_reduce_sum``)
returns the value of the global batch, the ranks' samples concatenated rank after rank. The
collective's backward sums the gradient over ranks and DDP averages it, which together give the
single-process gradient (the same argument as Fishr's, ``shared/DESIGN.md``). MMD's kernel is over
pairs of samples: it takes the gathered global batch instead.

Shapes in names: ``N`` samples, ``D`` features, ``C`` logits, ``E`` domains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lightning import functional as FF
from fishr_lightning.functional import FishrInputError

SumReduction = Callable[[Tensor], Tensor]

# DomainBed's AbstractMMD.gaussian_kernel: a mixture of Gaussian kernels exp(-γ‖x-y‖²) over these γ.
DOMAINBED_MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def _no_reduction(tensor: Tensor) -> Tensor:
    return tensor


def domain_one_hot(domains_N: Tensor, num_domains: int, dtype: torch.dtype) -> Tensor:
    """``[N, E]``: ``1`` where sample ``i`` belongs to domain ``e`` (ids outside ``0 .. E-1`` belong to none)."""
    return (domains_N[:, None] == torch.arange(num_domains, device=domains_N.device)).to(dtype)


def domain_counts(
    domains_N: Tensor, num_domains: int, dtype: torch.dtype, reduce: SumReduction | None = None
) -> Tensor:
    """``[E]``: samples of each domain (over all ranks with ``reduce``)."""
    counts_E = domain_one_hot(domains_N, num_domains, dtype).sum(dim=0)
    return (reduce or _no_reduction)(counts_E)


def check_every_domain_present(counts_E: Tensor, algorithm: str, minimum: int = 1) -> None:
    """DomainBed always has one minibatch per domain; a penalty over a missing domain is undefined."""
    missing = [e for e, n in enumerate(counts_E.tolist()) if n < minimum]
    if missing:
        raise FishrInputError(
            f"{algorithm} needs at least {minimum} sample(s) of every training domain in each step, but domain(s) "
            f"{missing} have fewer (counts {[int(n) for n in counts_E.tolist()]}). Draw every step's batch from "
            "all training domains (DomainBed's one minibatch per domain), or set num_domains to the domains present."
        )


# -- IRM (Arjovsky et al. 2019; DomainBed's IRM._irm_penalty) ------------------------------------------------------


def irm_scale_gradient_terms(logits_NC: Tensor, targets_N: Tensor) -> Tensor:
    """``[N]``: each sample's ``∂ CE(s·logits_i, y_i) / ∂s`` at the dummy scale ``s = 1``.

    ``d/ds [logsumexp(s·z) − s·z_y] = softmax(z)·z − z_y``: the closed form of the
    ``autograd.grad(loss, [scale], create_graph=True)`` of DomainBed's ``_irm_penalty``, kept in the graph.
    """
    probs_NC = logits_NC.softmax(dim=1)
    return (probs_NC * logits_NC).sum(dim=1) - logits_NC.gather(1, targets_N[:, None]).squeeze(1)


def irm_penalty(
    logits_NC: Tensor,
    targets_N: Tensor,
    domains_N: Tensor,
    num_domains: int,
    reduce: SumReduction | None = None,
    position_offset_E: Tensor | None = None,
) -> Tensor:
    """DomainBed's IRM penalty: per domain, the product of the dummy-scale gradients of the mean
    cross-entropy over the domain's even-indexed and odd-indexed samples (``logits[::2]``,
    ``logits[1::2]``, in the domain's batch order), averaged over domains.

    Under DDP, ``position_offset_E`` is where this rank's samples of each domain start in the global
    batch (the counts of the ranks before it), so that even and odd are the global batch's.
    """
    dtype = logits_NC.dtype
    one_hot_NE = domain_one_hot(domains_N, num_domains, dtype)
    position_NE = one_hot_NE.cumsum(dim=0) - 1  # index of each sample within its domain
    if position_offset_E is not None:
        position_NE = position_NE + position_offset_E.to(dtype)
    odd_NE = one_hot_NE * torch.remainder(position_NE, 2)
    even_NE = one_hot_NE - odd_NE
    terms_N = irm_scale_gradient_terms(logits_NC, targets_N)
    # One collective for both halves' sums and counts.
    sums = (reduce or _no_reduction)(
        torch.cat([terms_N @ even_NE, terms_N @ odd_NE, even_NE.sum(dim=0), odd_NE.sum(dim=0)])
    )
    even_sum_E, odd_sum_E, even_count_E, odd_count_E = sums.split(num_domains)
    check_every_domain_present(even_count_E + odd_count_E, "IRM", minimum=2)
    return ((even_sum_E / even_count_E) * (odd_sum_E / odd_count_E)).mean()


# -- V-REx (Krueger et al. 2021; DomainBed's VREx) -----------------------------------------------------------------


def domain_mean_losses(
    loss_N: Tensor, domains_N: Tensor, num_domains: int, reduce: SumReduction | None = None
) -> Tensor:
    """``[E]``: each domain's mean loss over its samples (of the global batch with ``reduce``)."""
    one_hot_NE = domain_one_hot(domains_N, num_domains, loss_N.dtype)
    sums = (reduce or _no_reduction)(torch.cat([loss_N @ one_hot_NE, one_hot_NE.sum(dim=0)]))
    loss_sum_E, count_E = sums.split(num_domains)
    check_every_domain_present(count_E, "This penalty")
    return loss_sum_E / count_E


def vrex_penalty(domain_losses_E: Tensor) -> Tensor:
    """V-REx's risk variance: the biased variance of the domains' mean losses, ``mean_e (L_e − mean L)²``."""
    return (domain_losses_E - domain_losses_E.mean()).pow(2).mean()


def domain_losses_ema(previous_E: Tensor | None, domain_losses_E: Tensor, ema: float) -> tuple[Tensor, Tensor]:
    """V-REx with an EMA of the domain risks (Rame et al., ICML 2022, appendix, Tables 9-10): Fishr's own
    moving average (its fork's ``MovingAverage(ema, oneminusema_correction=True)``, ``ema_update``) applied
    to the ``[E]`` mean losses in place of the gradient variances.

    ``m_e = ema·m_e^prev + (1-ema)·L_e`` (``m^prev = 0`` at the first update); returns the new state,
    detached, and ``m_e / (1-ema)``, the risks the variance is taken over: the gradient flows through
    this step's ``L_e`` only. ``ema=0`` returns ``L_e`` itself (DomainBed's V-REx).
    """
    return FF.ema_update(previous_E, domain_losses_E, ema)


# -- CORAL (Sun & Saenko 2016) and MMD (Li et al. 2018); DomainBed's AbstractMMD ----------------------------------


def pair_average(per_pair: Callable[[int, int], Tensor], num_domains: int) -> Tensor:
    """DomainBed's pairwise average: ``Σ_{i<j} per_pair(i, j) / (E(E−1)/2)``."""
    pairs = [(i, j) for i in range(num_domains) for j in range(i + 1, num_domains)]
    if not pairs:
        raise FishrInputError("Feature alignment compares pairs of training domains: it needs at least two.")
    return torch.stack([per_pair(i, j) for i, j in pairs]).sum() / len(pairs)


def domain_feature_moments(
    features_ND: Tensor, domains_N: Tensor, num_domains: int, reduce: SumReduction | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Each domain's feature mean ``[D]`` and unbiased covariance ``[D, D]`` (divided by ``n_e − 1``,
    as DomainBed's ``mmd`` with ``kernel_type == "mean_cov"``).

    Centred at the (global) mean before the outer products: two reductions, as stable as DomainBed's.
    """
    one_hot_NE = domain_one_hot(domains_N, num_domains, features_ND.dtype)
    N, D = features_ND.shape
    sums = (reduce or _no_reduction)(torch.cat([(one_hot_NE.T @ features_ND).reshape(-1), one_hot_NE.sum(dim=0)]))
    feature_sum_ED, count_E = sums[: num_domains * D].view(num_domains, D), sums[num_domains * D :]
    check_every_domain_present(count_E, "CORAL", minimum=2)
    mean_ED = feature_sum_ED / count_E[:, None]
    centred_ND = features_ND - one_hot_NE @ mean_ED  # each sample minus its domain's mean
    # Σ_i (z_i − μ_e)(z_i − μ_e)ᵀ over each domain's own rows: E products of n_e × D (a one-hot weighted
    # product over all N rows would cost E times as much). Kept as a list: stacking E copies of D × D
    # (and reducing over the stack) costs more than the products at D = 2048.
    scatters = [c_nD.T @ c_nD for c_nD in (centred_ND[domains_N == e] for e in range(num_domains))]
    if reduce is not None:
        scatters = list(reduce(torch.stack(scatters)).unbind(0))
    covariances = [scatter / (n - 1) for scatter, n in zip(scatters, count_E.unbind(0))]
    return list(mean_ED.unbind(0)), covariances


def mean_pairwise_squared_distance(values: Sequence[Tensor]) -> Tensor:
    """``Σ_{i<j} mean((v_i − v_j)²) / (E(E−1)/2)`` over ``E`` same-shaped tensors, through the identity
    ``Σ_{i<j} ‖v_i − v_j‖² = E · Σ_i ‖v_i − v̄‖²``: ``E`` differences from the mean instead of
    ``E(E−1)/2`` pairwise ones (CORAL's ``D × D`` covariances at DomainNet size: 137 ms instead of
    194 ms with the backward, CPU), and as stable, the differences being centred."""
    E = len(values)
    if E < 2:
        raise FishrInputError("Feature alignment compares pairs of training domains: it needs at least two.")
    mean = sum(values) / E
    return E * sum((value - mean).pow(2).mean() for value in values) / (E * (E - 1) / 2)


def no_pairs_penalty(features_ND: Tensor) -> Tensor:
    """The alignment penalty of one training domain: 0, as DomainBed's ``AbstractMMD.update``, which divides by
    the number of pairs only ``if nmb > 1`` and so trains ERM (issue 25: ``+sweep=domainbed_loo`` on a 3-domain
    dataset). A sum over no rows of the features: an exact 0 in the step's graph, whatever the features hold."""
    return features_ND[:0].sum()


def coral_penalty(
    features_ND: Tensor, domains_N: Tensor, num_domains: int, reduce: SumReduction | None = None
) -> Tensor:
    """DomainBed's CORAL: over pairs of domains, ``mean((μ_i − μ_j)²) + mean((Σ_i − Σ_j)²)``, averaged (0 with
    one domain)."""
    if num_domains == 1:
        return no_pairs_penalty(features_ND)
    means, covariances = domain_feature_moments(features_ND, domains_N, num_domains, reduce)
    return mean_pairwise_squared_distance(means) + mean_pairwise_squared_distance(covariances)


def squared_distances(x_ND: Tensor, y_MD: Tensor) -> Tensor:
    """``[N, M]``: ``‖x_i‖² + ‖y_j‖² − 2 x_i·y_j``, clamped at ``1e-30`` (DomainBed's ``my_cdist``: no square
    root, so its gradient is finite on the diagonal)."""
    x_norm_N1 = x_ND.pow(2).sum(dim=-1, keepdim=True)
    y_norm_M1 = y_MD.pow(2).sum(dim=-1, keepdim=True)
    return torch.addmm(y_norm_M1.T, x_ND, y_MD.T, alpha=-2).add(x_norm_N1).clamp_min(1e-30)


def gaussian_kernel_mixture(x_ND: Tensor, y_MD: Tensor, gammas: Sequence[float] = DOMAINBED_MMD_GAMMAS) -> Tensor:
    """``[N, M]``: ``Σ_γ exp(−γ‖x_i − y_j‖²)`` (DomainBed's ``gaussian_kernel``)."""
    distances_NM = squared_distances(x_ND, y_MD)
    return sum(torch.exp(-gamma * distances_NM) for gamma in gammas)


def mmd_penalty(
    features_ND: Tensor, domains_N: Tensor, num_domains: int, gammas: Sequence[float] = DOMAINBED_MMD_GAMMAS
) -> Tensor:
    """DomainBed's MMD: over pairs of domains, ``mean K(x,x) + mean K(y,y) − 2 mean K(x,y)`` with the
    Gaussian kernel mixture, averaged over pairs (biased estimator, as DomainBed).

    One kernel matrix over the whole batch, then its per-domain block means ``[E, E]``: the same
    numbers as DomainBed's pair-by-pair kernels, without computing each domain's own block ``E−1`` times.
    Under DDP pass the gathered global batch (``distributed.differentiable_all_gather``). 0 with one domain.
    """
    if num_domains == 1:
        return no_pairs_penalty(features_ND)
    one_hot_NE = domain_one_hot(domains_N, num_domains, features_ND.dtype)
    count_E = one_hot_NE.sum(dim=0)
    check_every_domain_present(count_E, "MMD")
    kernel_NN = gaussian_kernel_mixture(features_ND, features_ND, gammas)
    block_mean_EE = (one_hot_NE.T @ kernel_NN @ one_hot_NE) / (count_E[:, None] * count_E[None, :])

    def distance(i: int, j: int) -> Tensor:
        return block_mean_EE[i, i] + block_mean_EE[j, j] - 2 * block_mean_EE[i, j]

    return pair_average(distance, num_domains)


# -- GroupDRO (Sagawa et al. 2020, Algorithm 1; DomainBed's GroupDRO) ---------------------------------------------


def groupdro_update(q_E: Tensor, domain_losses_E: Tensor, eta: float) -> Tensor:
    """The next domain weights: ``q_e · exp(η · L_e)`` (losses detached), normalised to sum to 1."""
    q_E = q_E * torch.exp(eta * domain_losses_E.detach())
    return q_E / q_E.sum()


def groupdro_objective(q_E: Tensor, domain_losses_E: Tensor) -> Tensor:
    """GroupDRO's loss: ``Σ_e q_e L_e`` (``torch.dot(losses, q)``)."""
    return torch.dot(domain_losses_E, q_E.to(domain_losses_E.dtype))


# -- Spectral decoupling (Pezeshki et al. 2021, Eq. 25; DomainBed's SD) --------------------------------------------


def spectral_decoupling_penalty(logits_NC: Tensor, reduce: SumReduction | None = None) -> Tensor:
    """``mean(logits²)`` over every logit of the (global) batch; DomainBed's objective adds ``sd_reg`` times it."""
    sums = (reduce or _no_reduction)(
        torch.stack([logits_NC.pow(2).sum(), logits_NC.new_tensor(float(logits_NC.numel()))])
    )
    return sums[0] / sums[1]


# -- Mixup across domains (Xu et al. 2020, Yan et al. 2020; DomainBed's Mixup, misc.random_pairs_of_minibatches) --


def random_domain_pairs(num_domains: int, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """DomainBed's ``random_pairs_of_minibatches`` as domain indices: a random permutation ``π``, then the
    pairs ``(π_i, π_{i+1})`` with the last one wrapping round to ``π_0``: ``E`` pairs, each domain twice."""
    perm = torch.randperm(num_domains, generator=generator).tolist()
    return [(perm[i], perm[(i + 1) % num_domains]) for i in range(num_domains)]


def mixup_inputs(x_i: Tensor, x_j: Tensor, lam: float) -> tuple[Tensor, int]:
    """``lam·x_i + (1−lam)·x_j`` over the first ``min(n_i, n_j)`` samples of each, and that count."""
    n = min(len(x_i), len(x_j))
    return lam * x_i[:n] + (1 - lam) * x_j[:n], n


def mixup_loss(logits_NC: Tensor, y_i: Tensor, y_j: Tensor, lam: float) -> Tensor:
    """``lam·CE(logits, y_i) + (1−lam)·CE(logits, y_j)``, each a mean over the pair's samples."""
    return lam * F.cross_entropy(logits_NC, y_i) + (1 - lam) * F.cross_entropy(logits_NC, y_j)
