"""Auxiliary router losses, each as its paper defines it. Each is computed per routing group and averaged over
groups, so its value does not depend on how many ranks share a batch.

Checked against the authors' code (google-research/vmoe, `vmoe/nn/routing.py`: `_importance_auxiliary_loss`,
`_load_auxiliary_loss`, `_gshard_auxiliary_loss`).

Shape legend: G groups, U units per group, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cv_squared(x_GE: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over experts (population std), averaged over groups."""
    mean = x_GE.mean(-1)
    var = x_GE.var(-1, unbiased=False)
    return (var / (mean.square() + 1e-10)).mean()


def importance_loss(logits_GUE: torch.Tensor) -> torch.Tensor:
    """V-MoE importance loss (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", App. A;
    after Shazeer et al. 2017, eqs. 6-7), per routing group X:

        Imp_e(X) = sum_{x in X} softmax(W x)_e,        L_imp(X) = (std_e Imp(X) / mean_e Imp(X))^2.

    Takes the noise-free logits W x: the importance is of the gates before any routing noise (vmoe computes it on
    the softmax of the logits before the noise is added).
    """
    return cv_squared(logits_GUE.float().softmax(-1).sum(1))


def load_loss(logits_GUE: torch.Tensor, noisy_logits_GUE: torch.Tensor, top_k: int, sigma: float) -> torch.Tensor:
    """V-MoE load loss (Riquelme et al. 2021, App. A), per routing group X:

        threshold_k(x) = the k-th largest entry of W x + eps     (eps the noise drawn in this forward)
        p_e(x) = P((W x)_e + eps' >= threshold_k(x)) = 1 - Phi((threshold_k(x) - (W x)_e) / sigma)
        load_e(X) = sum_{x in X} p_e(x),                  L_load(X) = (std_e load(X) / mean_e load(X))^2

    with eps' a fresh draw of the noise, Phi the standard normal CDF and `sigma` the standard deviation of the noise
    actually added (in V-MoE's relative convention, noise_std / E; the caller passes the absolute value). Every
    expert, chosen or not, is compared with the same per-unit threshold, the unit's k-th largest noisy logit. (Shazeer
    et al. 2017 compare an expert already in the top-k with the (k+1)-th value instead; that is not V-MoE's loss.)
    The gradient reaches the gate through the logits and through the threshold (itself a noisy logit), as in vmoe's
    `_load_auxiliary_loss`.
    """
    threshold_GU1 = noisy_logits_GUE.float().topk(top_k, dim=-1).values[..., top_k - 1 :]
    z_GUE = (logits_GUE.float() - threshold_GU1) / sigma
    p_GUE = 0.5 * torch.erfc(-z_GUE * 0.5**0.5)  # 1 - Phi(-z) = Phi(z), written with erfc for accuracy in the tails
    return cv_squared(p_GUE.sum(1))


def switch_loss(probs_GUE: torch.Tensor, top1_GU: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2022, eqs. 4-6), the same as GShard's l_aux (Lepikhin
    et al. 2021, Algorithm 1, scaled by E^2 as in its code):

        L = E * sum_e f_e * P_e,   f_e = share of units whose first choice is e,   P_e = mean gate of e.

    Equals 1 under perfect balance; the gradient flows through P only (f is a count). `probs_GUE` are the gates
    that route (after noise, when there is noise, as vmoe's `_gshard_auxiliary_loss` is called).
    """
    E = probs_GUE.shape[-1]
    f_GE = F.one_hot(top1_GU, E).to(probs_GUE.dtype).mean(1)
    p_GE = probs_GUE.mean(1)
    return (E * (f_GE * p_GE).sum(-1)).mean()


def z_loss(logits_GUE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5): L_z = (1/B) sum_x (log sum_e exp (W x)_e)^2 over the
    units x, on the noise-free logits; keeps the logits small, which keeps the router numerically stable."""
    return torch.logsumexp(logits_GUE.float(), dim=-1).square().mean()
