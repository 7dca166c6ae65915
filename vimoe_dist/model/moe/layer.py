"""The MoE FFN of ViMoE: a drop-in for timm's `Mlp` inside a ViT block.

ViMoE (Han et al. 2024, "ViMoE: An Empirical Study of Designing Vision Mixture-of-Experts") routes whole images by
default: one decision per image from its pooled tokens, every token of the image going to the chosen experts; an
always-on shared expert is added to the routed output and keeps training stable whatever the number of MoE layers.
Token-level routing ("Routers in Vision MoE", V-MoE) is the other option.

Routing happens inside routing groups of `group_size` images: capacity and choices never cross a group, so the
result of a batch does not depend on how many ranks share it.

Shape legend:
    B: images   N: tokens per image   D: model dim   E: experts
    G: routing groups   U: units per group (images, or tokens)   R: rows (tokens) per unit
    X: rows in expert-major order
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from timm.layers import Mlp
from torch import nn

from vimoe_dist.model.moe.dispatch import Dispatcher, LocalDispatcher
from vimoe_dist.model.moe.experts import GroupedExperts


@runtime_checkable
class MoELayer(Protocol):
    """What the trainer, the routing monitor and the analysis read from an MoE FFN after a forward: ours
    (`MoEFFN`) or a reference layer of another library (`vimoe_dist.parallel.reference`)."""

    num_experts: int
    aux_loss: torch.Tensor  # the auxiliary loss of the last forward, weighted
    last_stats: dict[str, torch.Tensor]  # tokens per expert, dropped tokens, router entropy of the last forward


class MoEFFN(nn.Module):
    """Router + grouped experts (+ shared expert), with a swappable dispatcher.

    forward(x [B, N, D]) -> [B, N, D]; the auxiliary loss of the last forward is `self.aux_loss`, per-forward
    statistics (tensors, no host sync) are in `self.last_stats`, and with `record_routing` set the combine weights
    of every token for every expert are kept in `self.last_assignment` [B, N, E] for routing analysis.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        router: nn.Module,
        routing: str = "image",
        pool: str = "cls",
        group_size: int = 8,
        shared_expert: bool = True,
        num_prefix_tokens: int = 1,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if routing not in ("image", "token"):
            raise ValueError(f"model.moe.routing: {routing!r} is not one of image, token")
        if pool not in ("cls", "mean"):
            raise ValueError(f"model.moe.pool: {pool!r} is not one of cls, mean")
        self.num_experts, self.routing, self.pool, self.group_size = num_experts, routing, pool, group_size
        self.num_prefix_tokens = num_prefix_tokens
        self.top_k = getattr(router, "top_k", 1)
        self.router = router
        self.experts = GroupedExperts(num_experts, dim, hidden_dim, act_layer)
        # named `shared`, not `shared_expert`: DeepSpeed treats every state-dict key containing "expert" in an MoE
        # module as a routed expert's and would try to split it per expert when checkpointing
        self.shared = Mlp(dim, hidden_dim, act_layer=act_layer) if shared_expert else None
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.record_routing = False
        self.aux_loss = torch.zeros(())
        self.last_stats: dict[str, torch.Tensor] = {}
        self.last_assignment: torch.Tensor | None = None

    def routing_units(self, x_BND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Units the router sees, [G, U, D], and the rows each unit carries, [G, U, R, D]."""
        B, N, D = x_BND.shape
        if B % self.group_size:
            raise ValueError(f"model.moe.group_size: {self.group_size} images per group does not divide a batch of {B}")
        G = B // self.group_size
        if self.routing == "token":
            return x_BND.reshape(G, self.group_size * N, D), x_BND.reshape(G, self.group_size * N, 1, D)
        pooled_BD = x_BND[:, 0] if self.pool == "cls" else x_BND[:, self.num_prefix_tokens :].mean(1)
        return pooled_BD.reshape(G, self.group_size, D), x_BND.reshape(G, self.group_size, N, D)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        units_GUD, x_GURD = self.routing_units(x_BND)
        routing = self.router(units_GUD)
        x_XD, counts_E = routing.gather(x_GURD)
        y_XD = self.dispatcher(x_XD, counts_E, self.experts)
        y_BND = routing.scatter(y_XD, x_GURD.shape).reshape(B, N, D)
        if self.shared is not None:
            y_BND = y_BND + self.shared(x_BND)
        self.aux_loss = routing.aux_loss
        self._record(routing, B, N, rows_per_unit=x_GURD.shape[2])
        return y_BND

    @torch.no_grad()
    def _record(self, routing, B: int, N: int, rows_per_unit: int) -> None:
        probs = routing.probs_GUE
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        self.last_stats = {
            "tokens": routing.units_per_expert() * rows_per_unit,
            "dropped": routing.dropped_units() * rows_per_unit,
            "entropy": entropy,
        }
        if self.record_routing:
            w = routing.unit_expert_weights().float()
            self.last_assignment = w.view(B, 1, -1).expand(B, N, -1) if self.routing == "image" else w.view(B, N, -1)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, routing={self.routing}, pool={self.pool}, "
            f"group_size={self.group_size}, dispatcher={self.dispatcher!r}"
        )
