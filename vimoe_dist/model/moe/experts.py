"""A bank of FFN experts with stacked weights, run on rows already sorted by expert.

Shape legend: E experts (local ones, once expert parallelism has sharded the bank), D model dim, H hidden dim,
X rows in expert-major order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_available(x: torch.Tensor) -> bool:
    """True where torch has a fused grouped GEMM for `x`: `F.grouped_mm` on CUDA, bf16, compute capability >= 8.0
    (its documented domain; elsewhere it is absent or falls back to a loop of its own)."""
    return (
        hasattr(F, "grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


class GroupedExperts(nn.Module):
    """E two-layer GELU FFNs (timm `Mlp` each) whose weights are stacked, so that slicing a shard of experts or
    copying one dense FFN into all of them is a tensor operation.

    Every expert runs on its own contiguous slice of rows (sizes may differ: this is what makes dropless routing cost
    exactly the routed rows); no row is padded and no dense [T, E, C] tensor is ever built. Two paths compute it:
    - grouped GEMM (`F.grouped_mm`, one kernel for all experts' slices, offsets on the device, no host sync) where
      torch has a fused kernel: CUDA, bf16, sm80+;
    - elsewhere one matmul pair per expert (torchtitan's for-loop path), which on CPU is as fast: there the matmuls
      dominate and a grouped call would loop the same way.
    `grouped_mm` = None picks per call (`grouped_mm_available`); True or False forces a path (tests, benchmarks).
    """

    grouped_mm: bool | None = None

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = act_layer()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # timm's ViT init for Linear layers: truncated normal std 0.02, zero bias; independent per expert
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)

    @torch.no_grad()
    def copy_from_mlp(self, mlp: nn.Module, out_scale: float = 1.0) -> None:
        """Every expert becomes a copy of a timm `Mlp` (sparse upcycling, Komatsuzaki et al. 2023); `out_scale`
        scales the output projection (0.5 when a shared expert takes the other half)."""
        self.fc1_weight.copy_(mlp.fc1.weight.expand_as(self.fc1_weight))
        self.fc1_bias.copy_(mlp.fc1.bias.expand_as(self.fc1_bias))
        self.fc2_weight.copy_((mlp.fc2.weight * out_scale).expand_as(self.fc2_weight))
        self.fc2_bias.copy_((mlp.fc2.bias * out_scale).expand_as(self.fc2_bias))

    def forward(self, x_XD: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
        use_grouped = grouped_mm_available(x_XD) if self.grouped_mm is None else self.grouped_mm
        if use_grouped:
            return self._forward_grouped(x_XD, counts_E)
        sizes = counts_E.tolist() if torch.is_tensor(counts_E) else list(counts_E)
        outs = []
        # unbind, not indexing: the backward of w[e] would build a zero gradient of the whole bank for every
        # expert, while unbind's backward stacks the per-expert gradients once
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias))
        # empty slices run too (they cost nothing): every expert's weights then get a (zero) gradient on every rank
        for e, x in enumerate(torch.split(x_XD, sizes)):
            outs.append(F.linear(self.act(F.linear(x, w1[e], b1[e])), w2[e], b2[e]))
        return torch.cat(outs)

    def _forward_grouped(self, x_XD: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
        counts = torch.as_tensor(counts_E, device=x_XD.device)
        offsets = counts.cumsum(0).to(torch.int32)
        X = x_XD.shape[0]
        # the per-expert biases broadcast to the rows (grouped_mm's own bias is one for all groups)
        b1_XH = self.fc1_bias.to(x_XD.dtype).repeat_interleave(counts, dim=0, output_size=X)
        b2_XD = self.fc2_bias.to(x_XD.dtype).repeat_interleave(counts, dim=0, output_size=X)
        w1 = self.fc1_weight.to(x_XD.dtype).transpose(-2, -1)  # [E, D, H], the nn.Linear layout transposed
        w2 = self.fc2_weight.to(x_XD.dtype).transpose(-2, -1)  # [E, H, D]
        h_XH = self.act(F.grouped_mm(x_XD, w1, offs=offsets) + b1_XH)
        return F.grouped_mm(h_XH, w2, offs=offsets) + b2_XD

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}"
