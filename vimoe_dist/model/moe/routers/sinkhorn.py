"""Log-space Sinkhorn balancing of router logits (Cuturi 2013; used for routing by Clark et al. 2022, S-BASE).

Shape legend: G groups, U units per group, E experts.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sinkhorn_log(logits_GUE: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Log of the transport plan with uniform marginals (each unit mass 1/U, each expert mass 1/E) closest in KL to
    softmax(logits); fixed iterations so the cost is predictable. Returns log P, [G, U, E], in fp32.

    The plan only selects experts: no gradient flows through it (the combine weights come from the softmax gates),
    as in S-BASE and "Routers in Vision MoE".
    """
    log_p = logits_GUE.float()
    U, E = log_p.shape[-2:]
    log_u, log_e = -math.log(U), -math.log(E)
    for _ in range(num_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True) + log_u  # rows sum to 1/U
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True) + log_e  # columns sum to 1/E
    return log_p
