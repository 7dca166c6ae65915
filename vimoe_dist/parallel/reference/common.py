"""What both reference layers share: the shared expert, aux-loss weighting and per-forward statistics."""

from __future__ import annotations

import abc

import torch
from timm.layers import Mlp
from torch import nn

from vimoe_dist.config import MoEConfig
from vimoe_dist.model.moe.dispatch import LocalDispatcher


class ReferenceMoEFFN(nn.Module, metaclass=abc.ABCMeta):
    """Base: subclasses set `self.moe` and implement `route(x_TD) -> (y_TD, l_aux, tokens_per_expert_E)`.

    The factory signature is `build_moe`'s; `num_prefix_tokens` matters only to image routing, which these layers do
    not offer."""

    def __init__(
        self, dim: int, hidden_dim: int, moe_cfg: MoEConfig, num_prefix_tokens: int = 1, num_tokens: int | None = None
    ) -> None:
        super().__init__()
        if moe_cfg.router != "tc-softmax" or moe_cfg.routing != "token":
            raise ValueError(f"{type(self).__name__}: only token routing (model.moe.routing) with router tc-softmax")
        self.num_experts, self.top_k, self.routing = moe_cfg.num_experts, moe_cfg.top_k, "token"
        self.aux_weight = moe_cfg.switch_loss
        self.shared = Mlp(dim, hidden_dim) if moe_cfg.shared_expert else None
        self.dispatcher = LocalDispatcher()  # not swappable: these layers move tokens their own way
        self.aux_loss = torch.zeros(())
        self.last_stats: dict[str, torch.Tensor] = {}

    @abc.abstractmethod
    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One routing group of tokens -> (output, the library's aux loss, tokens per expert)."""

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        y_TD, l_aux, tokens_E = self.route(x_BND.reshape(B * N, D))
        y = y_TD.reshape(B, N, D)
        if self.shared is not None:
            y = y + self.shared(x_BND)
        self.aux_loss = self.aux_weight * l_aux
        with torch.no_grad():
            tokens = tokens_E.long()
            self.last_stats = {
                "tokens": tokens,
                "dropped": torch.clamp(B * N * self.top_k - tokens.sum(), min=0),
                "entropy": torch.zeros((), device=x_BND.device),
            }
        return y
