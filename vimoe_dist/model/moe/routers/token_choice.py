"""Token Choice routers: every unit picks its top-k experts; experts take units until their capacity is full.

Shape legend:
    G: routing groups   U: units per group   D: model dim   E: experts   K: choices per unit (top_k)
    C: capacity (slots per expert per group)   A: kept assignments
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vimoe_dist.model.moe.routers.base import SparseRouting, capacity
from vimoe_dist.model.moe.routers.common import AuxLossWeights, LinearGate, add_gate_noise, as_groups, check_weight
from vimoe_dist.model.moe.routers.sinkhorn import sinkhorn_log


class TokenChoiceTopK(nn.Module):
    """Softmax top-k Token Choice with capacity and Batch Prioritized Routing (V-MoE, Riquelme et al. 2021;
    "Routers in Vision MoE", Liu et al. 2024, registered as `tc-softmax`).

    Steps, per routing group:
      1. gates = softmax(x W + eps) in fp32, eps ~ N(0, (noise_std / E)^2) while training (V-MoE's relative noise;
         `noise_std: 1.0` is vmoe's default), none in evaluation; the noisy gates pick and weight (as in vmoe);
      2. each unit picks its k highest gates; weights are those gates, renormalised over the k when `renormalize`;
      3. choices fill expert buffers in priority order: all first choices before any second choice, and within one
         choice level units in order of their top gate when `bpr` (Batch Prioritized Routing), else in input order;
      4. a choice that finds its expert's C = ceil(k U cf / E) slots full is dropped (`capacity_factor=None`: none is).

    Auxiliary losses (`losses.py`): V-MoE's importance loss on the noise-free gates and load loss on the noisy ones
    (it needs `noise_std > 0`), the Switch/GShard loss on the routing gates, the router z-loss.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 1,
        bpr: bool = True,
        renormalize: bool = False,
        noise_std: float = 0.0,
        **loss_weights: float,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: {top_k} must be between 1 and num_experts={num_experts}")
        self.gate = LinearGate(dim, num_experts)
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.min_capacity, self.bpr, self.renormalize = min_capacity, bpr, renormalize
        self.noise_std = check_weight("noise_std", noise_std)
        self.aux = AuxLossWeights(**loss_weights)

    def selection_logits(self, logits_GUE: torch.Tensor) -> torch.Tensor:
        """Scores that pick the experts; the softmax gates still weight the outputs."""
        return logits_GUE

    def forward(self, x: torch.Tensor) -> SparseRouting:
        x_GUD, squeeze = as_groups(x)
        G, U, _ = x_GUD.shape
        E, K = self.num_experts, self.top_k
        logits_GUE = self.gate(x_GUD)
        noisy_GUE = add_gate_noise(logits_GUE, self.noise_std, self.training)
        probs_GUE = noisy_GUE.softmax(-1)
        choice_GUK = self.selection_logits(noisy_GUE).topk(K, dim=-1).indices
        gates_GUK = probs_GUE.gather(-1, choice_GUK)
        # BPR priority is the raw top gate: after renormalisation every k=1 gate is 1 and the order would be lost
        priority_GU = gates_GUK[..., 0].detach()
        if self.renormalize:
            gates_GUK = gates_GUK / gates_GUK.sum(-1, keepdim=True)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = capacity(U, E, K, cf, self.min_capacity)

        # priority order of units within each group
        if self.bpr:
            order_GU = torch.argsort(priority_GU, dim=1, descending=True, stable=True)
        else:
            order_GU = torch.arange(U, device=x.device).expand(G, U)
        choice_GKU = choice_GUK.gather(1, order_GU[..., None].expand(G, U, K)).transpose(1, 2)
        # position of each choice in its expert's buffer: running count of earlier choices of the same expert
        onehot_GXE = F.one_hot(choice_GKU.reshape(G, K * U), E)
        slot_GX = ((onehot_GXE.cumsum(1) - 1) * onehot_GXE).sum(-1)
        keep_GX = slot_GX < cap if cf is not None else torch.ones_like(slot_GX, dtype=torch.bool)

        g, x_idx = keep_GX.nonzero(as_tuple=True)
        k_idx, pos = x_idx // U, x_idx % U
        unit = order_GU[g, pos]
        routing = SparseRouting.from_choices(
            unit_A=g * U + unit,
            expert_A=choice_GKU.reshape(G, K * U)[g, x_idx],
            slot_A=slot_GX[g, x_idx],
            weight_A=gates_GUK[g, unit, k_idx],
            num_groups=G,
            num_units=U,
            num_experts=E,
            capacity=cap,
            probs_GUE=probs_GUE,
            aux_loss=self.aux(logits_GUE, probs_GUE, choice_GUK[..., 0], noisy_GUE, K, self.noise_std),
            squeeze=squeeze,
        )
        return routing


class TokenChoiceSinkhorn(TokenChoiceTopK):
    """Token Choice on a Sinkhorn-balanced assignment (`tc-sinkhorn`; S-BASE, Clark et al. 2022, as evaluated in
    "Routers in Vision MoE"): each unit picks its top-k experts under the balanced plan log P instead of its raw
    logits, which spreads units evenly before capacity is applied; outputs are still weighted by softmax gates."""

    def __init__(self, dim: int, num_experts: int, sinkhorn_iters: int = 10, **kw) -> None:
        super().__init__(dim, num_experts, **kw)
        self.sinkhorn_iters = sinkhorn_iters

    def selection_logits(self, logits_GUE: torch.Tensor) -> torch.Tensor:
        return sinkhorn_log(logits_GUE, self.sinkhorn_iters)
