"""Expert Choice routers: every expert picks the C units it scores highest (Zhou et al. 2022, "Mixture-of-Experts
with Expert Choice Routing"); buffers are always full, so nothing overflows, but a unit may be picked by no expert.

Shape legend:
    G: routing groups   U: units per group   D: model dim   E: experts   C: capacity   A: kept assignments (G*E*C)
"""

from __future__ import annotations

import torch
from torch import nn

from vimoe_dist.model.moe.routers.base import SparseRouting, capacity
from vimoe_dist.model.moe.routers.common import AuxLossWeights, LinearGate, add_gate_noise, as_groups, check_weight
from vimoe_dist.model.moe.routers.sinkhorn import sinkhorn_log


class ExpertChoice(nn.Module):
    """Softmax Expert Choice (`ec-softmax`).

    Steps, per routing group:
      1. gates = softmax over experts of x W + eps, in fp32, eps ~ N(0, (noise_std / E)^2) while training and none
         in evaluation (vmoe's `NoisyTopItemsPerExpertRouter`: the same relative noise as V-MoE's token choice);
      2. C = ceil(k U cf / E): on average each unit is processed by k * cf experts;
      3. each expert takes the C units with the highest selection score (the gate here) and weights each
         output by that unit's gate.
    Buffers are full by construction, so the authors use no balancing loss; the configured ones still apply (the
    importance and z-losses on the noise-free logits).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = 1.0,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 1,
        noise_std: float = 0.0,
        **loss_weights: float,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: {top_k} must be between 1 and num_experts={num_experts}")
        if capacity_factor is None:
            raise ValueError("capacity_factor: expert choice needs a capacity (null means dropless token choice)")
        self.gate = LinearGate(dim, num_experts)
        self.num_experts, self.top_k, self.min_capacity = num_experts, top_k, min_capacity
        self.capacity_factor = capacity_factor
        self.noise_std = check_weight("noise_std", noise_std)
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.aux = AuxLossWeights(**loss_weights)

    def selection_scores(self, logits_GUE: torch.Tensor, probs_GUE: torch.Tensor, capacity: int) -> torch.Tensor:
        """Scores by which experts pick their `capacity` units; subclasses balance them first."""
        return probs_GUE

    def forward(self, x: torch.Tensor) -> SparseRouting:
        x_GUD, squeeze = as_groups(x)
        G, U, _ = x_GUD.shape
        E = self.num_experts
        logits_GUE = self.gate(x_GUD)
        noisy_GUE = add_gate_noise(logits_GUE, self.noise_std, self.training)
        probs_GUE = noisy_GUE.softmax(-1)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = capacity(U, E, self.top_k, cf, self.min_capacity)
        scores_GEU = self.selection_scores(noisy_GUE, probs_GUE, cap).transpose(1, 2)
        unit_GEC = scores_GEU.topk(cap, dim=-1).indices
        weight_GEC = probs_GUE.transpose(1, 2).gather(-1, unit_GEC)
        group = torch.arange(G, device=x.device)[:, None, None]
        # expert-major order (expert, group, slot) straight from the layout: no sort needed
        unit_A = (group * U + unit_GEC).transpose(0, 1).reshape(-1)
        expert_A = torch.arange(E, device=x.device)[:, None, None].expand(E, G, cap).reshape(-1)
        slot_A = torch.arange(cap, device=x.device).expand(E, G, cap).reshape(-1)
        return SparseRouting(
            unit_A=unit_A,
            expert_A=expert_A,
            slot_A=slot_A,
            weight_A=weight_GEC.transpose(0, 1).reshape(-1),
            num_groups=G,
            num_units=U,
            num_experts=E,
            capacity=cap,
            probs_GUE=probs_GUE,
            aux_loss=self.aux(logits_GUE, probs_GUE),
            squeeze=squeeze,
        )


class ExpertChoiceSinkhorn(ExpertChoice):
    """Expert Choice on a Sinkhorn-balanced plan (`ec-sinkhorn`, "Routers in Vision MoE"): experts pick their top-C
    units under the plan log P, so a unit wanted by every expert no longer crowds out the rest; weights are the
    softmax gates."""

    def __init__(self, dim: int, num_experts: int, sinkhorn_iters: int = 10, **kw) -> None:
        super().__init__(dim, num_experts, **kw)
        self.sinkhorn_iters = sinkhorn_iters

    def selection_scores(self, logits_GUE: torch.Tensor, probs_GUE: torch.Tensor, capacity: int) -> torch.Tensor:
        return sinkhorn_log(logits_GUE, self.sinkhorn_iters)
