"""Auxiliary router losses. Each is computed per routing group and averaged over groups, so its value does not
depend on how many ranks share a batch.

Shape legend: G groups, U units per group, E experts, K choices per unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cv_squared(x_GE: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over experts, averaged over groups."""
    mean = x_GE.mean(-1)
    var = x_GE.var(-1, unbiased=False)
    return (var / (mean.square() + 1e-10)).mean()


def importance_loss(probs_GUE: torch.Tensor) -> torch.Tensor:
    """CV^2 of each expert's summed gates (Shazeer et al. 2017, "Outrageously large neural networks")."""
    return cv_squared(probs_GUE.sum(1))


def load_loss(logits_GUE: torch.Tensor, noisy_logits_GUE: torch.Tensor, top_k: int, noise_std: float) -> torch.Tensor:
    """CV^2 of each expert's smooth load: the probability, under the gate noise, that the expert is among a unit's
    top-k (Shazeer et al. 2017; the V-MoE form, Riquelme et al. 2021). Needs noise_std > 0."""
    if top_k >= logits_GUE.shape[-1]:  # every expert is always chosen: the load is flat and there is no (k+1)-th value
        return logits_GUE.new_zeros(())
    top_vals = noisy_logits_GUE.topk(top_k + 1, dim=-1).values
    in_top = noisy_logits_GUE >= top_vals[..., top_k - 1 : top_k]
    # an expert in the top-k must beat the (k+1)-th value; one outside must beat the k-th
    threshold = torch.where(in_top, top_vals[..., top_k : top_k + 1], top_vals[..., top_k - 1 : top_k])
    normal = torch.distributions.Normal(0.0, noise_std)
    p_GUE = normal.cdf(logits_GUE - threshold.detach())
    return cv_squared(p_GUE.sum(1))


def switch_loss(probs_GUE: torch.Tensor, top1_GU: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch Transformer; GShard's form): f_e the share of units whose first choice is e,
    P_e the mean gate of e. Equals 1 under perfect balance."""
    E = probs_GUE.shape[-1]
    f_GE = F.one_hot(top1_GU, E).to(probs_GUE.dtype).mean(1)
    p_GE = probs_GUE.mean(1)
    return (E * (f_GE * p_GE).sum(-1)).mean()


def z_loss(logits_GUE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE): mean squared log-partition, keeps logits small for stability."""
    return torch.logsumexp(logits_GUE, dim=-1).square().mean()
