"""Float32 accuracy of Fishr's one-pass variance ``E[g²] − E[g]²`` on realistic magnitudes.

DomainNet-like head: C = 345 classes, post-ReLU features of scale 1-10, a confident softmax
(samples right with p ≈ 0.99, and 10 % or none of them mislabelled), 5 domains of 32 samples with shifted features.
The reference is the centred two-pass variance ``mean_i (g_i − ḡ_e)²`` of materialised per-sample
gradients in float64. Measured: the relative error of the penalty ``P`` and of its gradients with
respect to the features (the backbone's path) and to the head's weight, for

- ``one-pass fp32``: the core's closed form (``fishr_lightning.functional``) in float32;
- ``two-pass fp32``: the materialised centred reference in float32 (what a stable form can reach).

Run: ``python benchmarks/float32_variance.py [--features 512 2048] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from fishr_lightning import functional as FF

C, E, PER_DOMAIN = 345, 5, 32


def make_problem(
    D: int, seed: int, wrong_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    N = E * PER_DOMAIN
    domains_N = torch.arange(N) % E
    scale_N = 1.0 + 9.0 * torch.rand(N, 1, generator=g, dtype=torch.float64)  # feature scale 1-10
    shift_ED = 0.5 * torch.randn(E, D, generator=g, dtype=torch.float64)  # domain shift
    features_ND = torch.relu(
        scale_N * (torch.randn(N, D, generator=g, dtype=torch.float64) + 0.5 + shift_ED[domains_N])
    )
    weight_CD = torch.randn(C, D, generator=g, dtype=torch.float64) / (features_ND.square().mean().sqrt() * D**0.5)
    bias_C = torch.zeros(C, dtype=torch.float64)
    logits_NC = features_ND @ weight_CD.T
    # Confident: scale the logits so the top class has p ≈ 0.99 for a typical sample.
    temperature = 8.0 / logits_NC.std()
    weight_CD = weight_CD * temperature
    logits_NC = features_ND @ weight_CD.T
    targets_N = logits_NC.argmax(dim=1)
    wrong_N = torch.rand(N, generator=g) < wrong_fraction
    targets_N[wrong_N] = torch.randint(0, C, (int(wrong_N.sum()),), generator=g)
    return features_ND, weight_CD, bias_C, targets_N, domains_N


def one_pass_penalty(features_ND, weight_CD, bias_C, targets_N, domains_N):
    logits_NC = features_ND @ weight_CD.T + bias_C
    delta_NC = FF.logit_gradients(logits_NC, targets_N)
    moments = FF.closed_form_moments(features_ND, delta_NC, domains_N, E)
    return FF.gradient_variance_distance(FF.domain_gradient_variance(moments))


def two_pass_penalty(features_ND, weight_CD, bias_C, targets_N, domains_N):
    logits_NC = features_ND @ weight_CD.T + bias_C
    delta_NC = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits_NC, targets_N, reduction="sum"), logits_NC, create_graph=True
    )[0]
    variances = []
    for e in range(E):
        z_nD, d_nC = features_ND[domains_N == e], delta_NC[domains_N == e]
        g_nP = torch.cat([(d_nC[:, :, None] * z_nD[:, None, :]).flatten(1), d_nC], dim=1)
        variances.append((g_nP - g_nP.mean(dim=0)).square().mean(dim=0))
    return FF.gradient_variance_distance(torch.stack(variances))


def penalty_and_gradients(penalty_fn, dtype, problem):
    features_ND, weight_CD, bias_C, targets_N, domains_N = problem
    features_ND = features_ND.to(dtype).requires_grad_(True)
    weight_CD = weight_CD.to(dtype).requires_grad_(True)
    penalty = penalty_fn(features_ND, weight_CD, bias_C.to(dtype), targets_N, domains_N)
    grad_features, grad_weight = torch.autograd.grad(penalty, [features_ND, weight_CD])
    return penalty.detach().double(), grad_features.double(), grad_weight.double()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Normwise: ``max |x − x_ref| / max |x_ref|``."""
    return float((value - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"C={C}, E={E} domains x {PER_DOMAIN} samples; reference: centred two-pass in float64")
    print(
        f"{'D':>5} {'wrong':>5} {'seed':>4} {'variant':>14} {'P (fp64)':>11} {'rel err P':>10} {'rel err dP/dz':>13} {'rel err dP/dW':>13}"
    )
    worst: dict[str, list[float]] = {}
    for D, wrong_fraction, seed in itertools.product(args.features, (0.1, 0.0), range(args.seeds)):
        problem = make_problem(D, seed, wrong_fraction)
        ref_p, ref_gz, ref_gw = penalty_and_gradients(two_pass_penalty, torch.float64, problem)
        for name, fn in (("one-pass fp32", one_pass_penalty), ("two-pass fp32", two_pass_penalty)):
            p, gz, gw = penalty_and_gradients(fn, torch.float32, problem)
            errors = [abs(float(p - ref_p)) / abs(float(ref_p)), relative_error(gz, ref_gz), relative_error(gw, ref_gw)]
            worst[name] = [max(a, b) for a, b in zip(worst.get(name, [0.0] * 3), errors)]
            print(
                f"{D:>5} {wrong_fraction:>5} {seed:>4} {name:>14} {float(ref_p):>11.4e} {errors[0]:>10.2e} {errors[1]:>13.2e} {errors[2]:>13.2e}"
            )
    print("\nworst over all rows:")
    for name, (ep, egz, egw) in worst.items():
        print(f"  {name:>14}: penalty {ep:.2e}, dP/dfeatures {egz:.2e}, dP/dW {egw:.2e}")


if __name__ == "__main__":
    main()
