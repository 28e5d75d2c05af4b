"""``FishrPenalty``: the stateful shell over ``functional`` (options, EMA state, input checks).

Pure torch, no Lightning: ``FishrCallback`` and ``FishrMixin`` both call this one object, and so
can any plain training loop.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from fishr_lightning import functional as FF
from fishr_lightning.distributed import MaxReduction, MomentsReduction
from fishr_lightning.functional import FishrInputError, HeadGradientMoments, LossName, PerSampleLoss, Reduction

Backend = Literal["closed_form", "backpack"]
Covariance = Literal["diagonal", "full"]


class FishrPenalty:
    """Fishr's penalty for one linear head, with the per-domain EMA of gradient variances.

    Args:
        num_domains: number of training domains ``E``; domain ids are ``0 .. E-1``. ``None`` takes
            ``max id + 1`` of the first batch (over all ranks when ``reduce_max`` is given; every
            later batch must then hold every domain). ``reset()`` forgets the inferred value.
        ema: EMA decay γ of each domain's gradient variance (DomainBed: 0.95); 0 disables the EMA.
        centered: centred variance (default) or uncentred second moment (paper, Table 6).
        param_reduction: ``"mean"`` (DomainBed) or ``"sum"`` (paper's Colored MNIST) over parameters.
        domain_reduction: ``"mean"`` (DomainBed) or ``"sum"`` (paper's Colored MNIST) over domains.
        loss: the per-sample loss whose gradients are used: ``"cross_entropy"`` (default),
            ``"bce_with_logits"`` (one-logit heads) or a callable ``(logits, targets) -> [N]``.
        backend: ``"closed_form"`` (default; two matmuls, exact) or ``"backpack"`` (BackPACK's
            ``BatchGrad``, the paper's route; needs the head passed to ``__call__``).
        reduce_moments: applied to each batch's per-domain moments before the variances are formed;
            data-parallel training passes ``distributed.all_reduce_moments`` here.
        reduce_max: applied to the first batch's largest domain id when ``num_domains`` is inferred;
            data-parallel training passes ``distributed.all_reduce_max`` here.
        head_bias: whether the head has a bias, used when no ``head`` is passed to the call
            (default ``True``); a bias-free head has ``C·D`` parameters, not ``C·D + C``.
        covariance: ``"diagonal"`` (default, Fishr: each domain's gradient variances) or ``"full"``:
            each domain's whole covariance matrix of the per-sample gradients, per parameter group
            (weight, bias), each divided by the group's size, as the paper's Table 6 ablation (its
            Colored MNIST variant ``fishr_offdiagonal``): ``reduce_e reduce_entries (S_e − S̄)²`` with
            ``S_e = Ĝ_eᵀĜ_e/(n_e·P_g)``. Computed exactly from ``N×N`` Gram matrices of the gradients
            (``g_iᵀg_j = (δ_iᵀδ_j)(z_iᵀz_j)``), never a ``P×P`` matrix: affordable at DomainNet's head
            (``functional.full_covariance_distance``; timing in docs/lightning.md). When the batch is
            larger than the head (Colored MNIST: 50,000 samples, 391 parameters) the ``P_g×P_g``
            covariances are the smaller objects and are formed instead (``functional.full_covariance_route``). It needs
            ``ema=0`` (an EMA of ``P×P`` matrices is not affordable, and one on the Gram factors would
            keep every past batch; the paper's ablation has no EMA) and one process (under DDP it
            would need all per-sample factors all-gathered, not implemented).
    """

    def __init__(
        self,
        num_domains: int | None = None,
        ema: float = 0.95,
        centered: bool = True,
        param_reduction: Reduction = "mean",
        domain_reduction: Reduction = "mean",
        loss: LossName | PerSampleLoss = "cross_entropy",
        backend: Backend = "closed_form",
        reduce_moments: MomentsReduction | None = None,
        covariance: Covariance = "diagonal",
        reduce_max: MaxReduction | None = None,
        head_bias: bool = True,
    ) -> None:
        if not 0.0 <= ema < 1.0:
            raise FishrInputError(f"ema must be in [0, 1), got {ema}: it is the EMA decay γ (DomainBed: 0.95).")
        if backend not in ("closed_form", "backpack"):
            raise FishrInputError(f"Unknown backend {backend!r}: use 'closed_form' or 'backpack'.")
        for name, value in (("param_reduction", param_reduction), ("domain_reduction", domain_reduction)):
            if value not in ("mean", "sum"):
                raise FishrInputError(f"{name} must be 'mean' or 'sum', got {value!r}.")
        if not callable(loss) and loss not in ("cross_entropy", "bce_with_logits"):
            raise FishrInputError(f"Unknown loss {loss!r}: use 'cross_entropy', 'bce_with_logits' or a callable.")
        if num_domains is not None and num_domains < 1:
            raise FishrInputError(f"num_domains must be >= 1, got {num_domains}.")
        if covariance not in ("diagonal", "full"):
            raise FishrInputError(f"covariance must be 'diagonal' or 'full', got {covariance!r}.")
        if covariance == "full" and ema != 0.0:
            raise FishrInputError(
                f"covariance='full' needs ema=0, got ema={ema}: an EMA of each domain's P×P gradient covariance "
                "would hold P² numbers per domain (5·10¹¹ at DomainNet's head), and one kept on the N×N Gram "
                "factors would have to keep every past batch's gradients. The paper's full-covariance ablation "
                "(Table 6, Colored MNIST) uses no EMA: pass ema=0, or use covariance='diagonal' with the EMA."
            )
        self.num_domains = num_domains
        self.requested_num_domains = num_domains
        self.ema = ema
        self.centered = centered
        self.param_reduction = param_reduction
        self.domain_reduction = domain_reduction
        self.loss = loss
        self.backend = backend
        self.reduce_moments = reduce_moments
        self.covariance = covariance
        self.reduce_max = reduce_max
        self.head_bias = head_bias
        self.ema_state_EP: Tensor | None = None
        self.num_updates = 0

    def __call__(
        self,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets: Tensor,
        domains_N: Tensor,
        head: nn.Linear | None = None,
    ) -> Tensor:
        """Update each domain's EMA with this batch and return the penalty (a scalar, float32 or wider)."""
        if self.covariance == "full":
            penalty, count_E, unassigned = self._full_covariance_penalty(
                features_ND, logits_NC, targets, domains_N, head
            )
            self._check(count_E, unassigned, penalty, domains_N)
            self.num_updates += 1
            return penalty
        statistic_EX, count_E, unassigned = self.domain_statistics(features_ND, logits_NC, targets, domains_N, head)
        if self.ema_state_EP is not None and self.ema_state_EP.shape != statistic_EX.shape:
            raise FishrInputError(
                f"The head's gradient statistic has shape {tuple(statistic_EX.shape)} but the EMA state "
                f"holds {tuple(self.ema_state_EP.shape)}: the head or the number of domains changed "
                "since the state was created. Call reset() (or start from a matching checkpoint)."
            )
        ema_state_EX, smoothed_EX = FF.ema_update(self.ema_state_EP, statistic_EX, self.ema)
        penalty = FF.gradient_variance_distance(smoothed_EX, self.param_reduction, self.domain_reduction)
        self._check(count_E, unassigned, penalty, domains_N)
        self.ema_state_EP, self.num_updates = ema_state_EX, self.num_updates + 1
        return penalty

    def domain_statistics(
        self,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets: Tensor,
        domains_N: Tensor,
        head: nn.Linear | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Each domain's gradient statistic ``[E, X]``, its sample count ``[E]`` (global under DDP),
        and the number of this batch's samples whose id is outside ``[0, E)``.

        The statistic is the variances ``[E, P]``. ``covariance="full"`` has no per-domain statistic
        it could afford to return (``P×P`` matrices): its penalty comes from Gram matrices instead.
        """
        if self.covariance == "full":
            raise FishrInputError(
                "domain_statistics is the diagonal covariance's [E, P] variances; covariance='full' forms its "
                "penalty from N×N Gram matrices and never holds the P×P covariances. Call the penalty itself."
            )
        features_ND, logits_NC = self._prepare(features_ND, logits_NC, targets, domains_N)
        with torch.autocast(device_type=features_ND.device.type, enabled=False):
            moments = self._moments(features_ND, logits_NC, targets, domains_N, head)
            if self.reduce_moments is not None:
                moments = self.reduce_moments(moments)  # counts and num_samples become global too
            num_samples = moments.num_samples if moments.num_samples is not None else domains_N.shape[0]
            unassigned = num_samples - moments.count_E.sum()
            return FF.domain_gradient_variance(moments, centered=self.centered), moments.count_E, unassigned

    def _full_covariance_penalty(
        self, features_ND: Tensor, logits_NC: Tensor, targets: Tensor, domains_N: Tensor, head: nn.Linear | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The full-covariance penalty from the per-sample gradients' Gram matrices, the counts ``[E]`` and
        the number of samples with an id outside ``[0, E)``."""
        if self.reduce_moments is not None:
            raise FishrInputError(
                "covariance='full' does not run under distributed training: its penalty needs the Gram matrices "
                "of all samples of the global batch (the per-sample logit gradients and features all-gathered), "
                "not per-domain sums that ranks could all-reduce. Train on one process, or use covariance='diagonal'."
            )
        features_ND, logits_NC = self._prepare(features_ND, logits_NC, targets, domains_N)
        with torch.autocast(device_type=features_ND.device.type, enabled=False):
            has_bias = head.bias is not None if head is not None else self.head_bias
            N, C, D = features_ND.shape[0], logits_NC.shape[1], features_ND.shape[1]
            group_sizes = [C * D] + ([C] if has_bias else [])
            if FF.full_covariance_route(N, group_sizes, self.num_domains) == "covariances":
                grads_NP, group_sizes = self._per_sample_gradients(features_ND, logits_NC, targets, head)
                covariances = FF.domain_gradient_covariance(
                    grads_NP, domains_N, self.num_domains, group_sizes, self.centered
                )
                statistic_EX = torch.cat([c.reshape(self.num_domains, -1) / c.shape[-1] for c in covariances], dim=1)
                penalty = FF.gradient_variance_distance(statistic_EX, self.param_reduction, self.domain_reduction)
                count_E = FF.domain_indicator(domains_N, self.num_domains, grads_NP.dtype).sum(dim=0)
                return penalty, count_E, N - count_E.sum()
            if self.backend == "backpack":
                grads_NP, group_sizes = self._per_sample_gradients(features_ND, logits_NC, targets, head)
                grams_GNN = FF.per_sample_gradient_grams(grads_NP, group_sizes)
            else:
                delta_NC = FF.logit_gradients(logits_NC, targets, self.loss)
                grams_GNN = FF.head_gradient_grams(features_ND, delta_NC, bias=has_bias)
            penalty, count_E = FF.full_covariance_distance(
                grams_GNN,
                group_sizes,
                domains_N,
                self.num_domains,
                self.centered,
                self.param_reduction,
                self.domain_reduction,
            )
        return penalty, count_E, domains_N.shape[0] - count_E.sum()

    def moments(
        self,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets: Tensor,
        domains_N: Tensor,
        head: nn.Linear | None = None,
    ) -> HeadGradientMoments:
        """This batch's per-domain gradient moments (before any cross-rank reduction)."""
        features_ND, logits_NC = self._prepare(features_ND, logits_NC, targets, domains_N)
        with torch.autocast(device_type=features_ND.device.type, enabled=False):
            return self._moments(features_ND, logits_NC, targets, domains_N, head)

    def _moments(
        self, features_ND: Tensor, logits_NC: Tensor, targets: Tensor, domains_N: Tensor, head: nn.Linear | None
    ) -> HeadGradientMoments:
        if self.backend == "backpack":
            grads_NP, _ = self._per_sample_gradients(features_ND, logits_NC, targets, head)
            return FF.per_sample_moments(grads_NP, domains_N, self.num_domains)
        delta_NC = FF.logit_gradients(logits_NC, targets, self.loss)
        has_bias = head.bias is not None if head is not None else self.head_bias
        return FF.closed_form_moments(features_ND, delta_NC, domains_N, self.num_domains, bias=has_bias)

    def _per_sample_gradients(
        self, features_ND: Tensor, logits_NC: Tensor, targets: Tensor, head: nn.Linear | None
    ) -> tuple[Tensor, list[int]]:
        """Materialised ``[N, P]`` per-sample gradients and the sizes of the head's parameter groups."""
        if self.backend == "backpack":
            if head is None:
                raise FishrInputError("backend='backpack' needs the head module: pass head=... to the call.")
            grads_NP = FF.backpack_per_sample_gradients(head, features_ND, targets, self.loss)
            return grads_NP.to(features_ND.dtype), [p.numel() for p in (head.weight, head.bias) if p is not None]
        has_bias = head.bias is not None if head is not None else self.head_bias
        delta_NC = FF.logit_gradients(logits_NC, targets, self.loss)
        C, D = delta_NC.shape[1], features_ND.shape[1]
        return FF.closed_form_per_sample_gradients(features_ND, delta_NC, bias=has_bias), [C * D] + (
            [C] if has_bias else []
        )

    def _prepare(
        self, features_ND: Tensor, logits_NC: Tensor, targets: Tensor, domains_N: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Check shapes, fix ``num_domains`` on the first call, and promote half precision to float32
        (AMP): squared per-sample gradients underflow in float16."""
        self._check_shapes(features_ND, logits_NC, targets, domains_N)
        if self.num_domains is None:
            FF.domain_indicator(domains_N, 1, features_ND.dtype)  # refuses non-integer ids
            largest_id = domains_N.max()
            if self.reduce_max is not None:  # every rank must agree on E, whatever its local batch holds
                largest_id = self.reduce_max(largest_id)
            self.num_domains = int(largest_id) + 1
            if self.num_domains < 1:
                raise FishrInputError(
                    f"The first batch's largest domain id is {self.num_domains - 1}; domain ids index the "
                    "training domains 0 .. num_domains-1. Re-number them, or pass num_domains=..."
                )
        compute_dtype = torch.promote_types(features_ND.dtype, torch.float32)
        return features_ND.to(compute_dtype), logits_NC.to(compute_dtype)

    def _check(self, count_E: Tensor, unassigned: Tensor, penalty: Tensor, domains_N: Tensor) -> None:
        """Every check of a step from one host synchronisation: ids in range, ≥ 2 samples per
        domain, a finite penalty. The EMA state is only committed after they pass."""
        finite = torch.isfinite(penalty.detach()).to(count_E.dtype)
        *counts, unassigned_count, is_finite = torch.cat(
            [count_E.detach(), unassigned.detach()[None], finite[None]]
        ).tolist()
        if unassigned_count:
            FF.check_domain_ids(domains_N, self.num_domains)
            raise FishrInputError(  # the ids out of range are on another rank: every rank stops alike
                f"{round(unassigned_count)} sample(s) of the global batch have a domain id outside [0, "
                f"{self.num_domains}) on another process. Domain ids must index the training domains "
                "0 .. num_domains-1: re-number them or pass the right num_domains."
            )
        FF.check_domain_counts(counts)
        if not is_finite:
            raise FishrInputError(
                f"The Fishr penalty is {penalty.item()} at update {self.num_updates + 1}: the features or logits "
                "reaching the head are not finite, or their gradient variances overflow. Check the inputs and "
                "the learning rate, lower penalty_weight, or train in float32 (the penalty is always computed "
                "in float32, but the backbone's activations may already be inf/NaN)."
            )

    @staticmethod
    def _check_shapes(features_ND: Tensor, logits_NC: Tensor, targets: Tensor, domains_N: Tensor) -> None:
        if features_ND.dim() != 2:
            raise FishrInputError(
                f"The head's input has shape {tuple(features_ND.shape)}; Fishr needs one feature vector per "
                "sample, [N, D]. Flatten or pool the features before the final nn.Linear (a head applied "
                "to sequences or feature maps has per-sample gradients this closed form does not cover)."
            )
        if logits_NC.dim() != 2:
            raise FishrInputError(f"Logits must be [N, C], got shape {tuple(logits_NC.shape)}.")
        N = features_ND.shape[0]
        if logits_NC.shape[0] != N or targets.shape[0] != N or domains_N.shape != (N,):
            raise FishrInputError(
                f"Batch sizes disagree: features {tuple(features_ND.shape)}, logits {tuple(logits_NC.shape)}, "
                f"targets {tuple(targets.shape)}, domains {tuple(domains_N.shape)}; each needs one row per sample "
                "and domains must be a 1-D tensor of domain ids."
            )

    def penalty_for_weight(
        self,
        weight: float,
        features_ND: Tensor,
        logits_NC: Tensor,
        targets: Tensor,
        domains_N: Tensor,
        head: nn.Linear | None = None,
    ) -> Tensor:
        """The penalty ``P`` for a step whose weight is ``λ_t = weight``, with its graph only when ``weight > 0``.

        During warm-up DomainBed adds ``0 · P``: the EMA still moves but no gradient flows, so the
        closed form runs without a graph there (same numbers, no double-backward). With
        ``weight > 0`` logits that carry no graph (computed under ``no_grad``) are refused: the
        penalty would add nothing to the gradient.
        """
        if weight > 0 and not logits_NC.requires_grad:
            raise FishrInputError(
                f"The penalty weight is {weight} but the head's logits carry no autograd graph (the head ran "
                "under torch.no_grad/inference_mode, or on detached tensors with frozen weights), so the "
                "penalty would add no gradient. Run the head's forward with gradients enabled."
            )
        if weight > 0 or self.backend == "backpack":
            value = self(features_ND, logits_NC, targets, domains_N, head=head)
            return value if weight > 0 else value.detach()
        with torch.no_grad():
            return self(features_ND.detach(), logits_NC.detach(), targets, domains_N, head=head)

    def reset(self) -> None:
        """Start afresh (a new run, or a different head): forget the EMA and an inferred ``num_domains``."""
        self.ema_state_EP = None
        self.num_updates = 0
        self.num_domains = self.requested_num_domains

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_state_EP": None if self.ema_state_EP is None else self.ema_state_EP.detach().cpu().clone(),
            "num_updates": self.num_updates,
            "num_domains": self.num_domains,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_state_EP = state["ema_state_EP"]
        self.num_updates = int(state["num_updates"])
        if state.get("num_domains") is not None:
            if self.num_domains is not None and self.num_domains != state["num_domains"]:
                raise FishrInputError(
                    f"The checkpoint's Fishr state is for {state['num_domains']} domains, but num_domains="
                    f"{self.num_domains} was given: resume with the same training domains."
                )
            self.num_domains = int(state["num_domains"])
