"""fairscale's GShard layer (`MOELayer` + `Top2Gate`, Lepikhin et al. 2021).

GShard's gate has a fixed capacity of 2T/E and samples the second expert with Gumbel noise; `MOELayer` wants a
process group even on one device, so a one-process gloo group is created when none exists (this layer is a
comparison baseline, never part of a distributed run).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
from timm.layers import Mlp
from torch import nn

from vimoe_dist.config import MoEConfig
from vimoe_dist.errors import UserError
from vimoe_dist.parallel.reference.common import ReferenceMoEFFN

try:  # an optional extra: this layer is a comparison baseline, and fairscale (2022) ships as source only
    from fairscale.nn.moe import MOELayer, Top2Gate
except ImportError:
    raise UserError(
        "fairscale's MoE layer (a baseline of `vimoe bench moe`) needs the fairscale package: "
        "pip install 'vimoe-dist[fairscale]'"
    ) from None


def _ensure_process_group() -> None:
    if dist.is_initialized():
        return
    with tempfile.TemporaryDirectory(prefix="vimoe-fairscale-") as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)


class FairscaleMoEFFN(ReferenceMoEFFN):
    def __init__(
        self, dim: int, hidden_dim: int, moe_cfg: MoEConfig, num_prefix_tokens: int = 1, num_tokens: int | None = None
    ) -> None:
        super().__init__(dim, hidden_dim, moe_cfg, num_prefix_tokens)
        if moe_cfg.top_k != 2:
            raise ValueError(f"model.moe.top_k: fairscale's Top2Gate routes to 2 experts, not {moe_cfg.top_k}")
        _ensure_process_group()
        experts = nn.ModuleList(Mlp(dim, hidden_dim) for _ in range(moe_cfg.num_experts))
        self.moe = MOELayer(Top2Gate(dim, moe_cfg.num_experts), experts)
        self._dispatch_mask: torch.Tensor | None = None
        # MOELayer keeps its dispatch mask to itself; a hook on the gate reads the loads without routing twice
        self.moe.gate.register_forward_hook(self._keep_mask)

    def _keep_mask(self, module: nn.Module, args: tuple, out: tuple) -> None:
        self._dispatch_mask = out[2].detach()

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # MOELayer wants [S, T, D] with S a multiple of its local experts; it flattens S and T itself
        y = self.moe(x_TD.reshape(len(self.moe.experts), -1, x_TD.shape[-1])).reshape_as(x_TD)
        return y, self.moe.l_aux, self._dispatch_mask.sum(dim=(0, 2))
