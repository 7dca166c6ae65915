"""Expert-parallel dispatch: rows travel to the ranks that own their experts and back, with all-to-all.

The MoE layer hands over rows already sorted by global expert (`counts_E` rows for each of the E experts). Rank r of
the expert-parallel group owns experts [r * L, (r + 1) * L). The dispatcher
  1. exchanges the per-expert counts (a small all-to-all) so every rank knows what it will receive,
  2. sends each rank the rows of its experts (`all_to_all_single` with split sizes; autograd-aware, so the backward
     pass moves the gradients back the same way),
  3. reorders the received rows from (source rank, local expert) to (local expert, source rank) and runs the local
     experts, then undoes both steps.
Because routing groups never span ranks and each expert sees its rows in (source rank, group) order, the result
equals the single-process one whatever the layout (up to float reassociation).

Shape legend: E global experts, L local experts, P expert-parallel ranks, X rows, D model dim.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn


class AllToAllDispatcher:
    """Moves expert-major rows over the expert-parallel `group` of `ep_size` ranks."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int, num_experts: int) -> None:
        assert num_experts % ep_size == 0
        self.group, self.ep_size, self.num_experts = group, ep_size, num_experts
        self.num_local = num_experts // ep_size
        self.seconds = 0.0  # time spent in all-to-all, read by the metrics (host clock, no device sync)

    def __call__(self, x_XD: torch.Tensor, counts_E: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        P, L = self.ep_size, self.num_local
        t0 = time.perf_counter()
        send_PL = counts_E.view(P, L)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        # the one host sync of the layer: split sizes must be known on the host
        send_sizes = send_PL.sum(1).tolist()
        recv_counts = recv_PL.tolist()
        recv_sizes = [sum(row) for row in recv_counts]
        x_recv = _all_to_all(x_XD, recv_sizes, send_sizes, self.group)
        self.seconds += time.perf_counter() - t0

        # (source rank, local expert) -> (local expert, source rank)
        order = _regroup_order(recv_counts, x_XD.device)
        per_expert = [sum(recv_counts[p][e] for p in range(P)) for e in range(L)]
        y_local = experts(x_recv.index_select(0, order), per_expert)
        y_recv = torch.empty_like(y_local).index_copy_(0, order, y_local) if y_local.shape[0] else y_local

        t0 = time.perf_counter()
        y_XD = _all_to_all(y_recv, send_sizes, recv_sizes, self.group)
        self.seconds += time.perf_counter() - t0
        return y_XD

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size}, local_experts={self.num_local})"


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; the backward sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup):
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        out = x.new_empty((sum(out_sizes), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_sizes, in_sizes = ctx.sizes
        return _AllToAll.apply(grad, in_sizes, out_sizes, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    return _AllToAll.apply(x, out_sizes, in_sizes, group)


def _regroup_order(counts_PL: list[list[int]], device: torch.device) -> torch.Tensor:
    """Indices that read received rows (source-major blocks) in local-expert-major order."""
    P, L = len(counts_PL), len(counts_PL[0])
    starts, offset = [[0] * L for _ in range(P)], 0
    for p in range(P):
        for e in range(L):
            starts[p][e] = offset
            offset += counts_PL[p][e]
    pieces = [
        torch.arange(starts[p][e], starts[p][e] + counts_PL[p][e], device=device)
        for e in range(L)
        for p in range(P)
        if counts_PL[p][e]
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
