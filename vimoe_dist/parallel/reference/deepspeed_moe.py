"""DeepSpeed's own MoE layer (`deepspeed.moe.layer.MoE` with its TopKGate, k = 1 or 2).

Random token selection and the sampled second expert are switched off so that, on the same weights and with nothing
dropped, it computes what our `tc-softmax` does (renormalised over the two choices for k = 2, raw gate for k = 1).
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from timm.layers import Mlp

from vimoe_dist.config import MoEConfig
from vimoe_dist.parallel.reference.common import ReferenceMoEFFN


class DeepSpeedMoEFFN(ReferenceMoEFFN):
    def __init__(
        self, dim: int, hidden_dim: int, moe_cfg: MoEConfig, num_prefix_tokens: int = 1, num_tokens: int | None = None
    ) -> None:
        super().__init__(dim, hidden_dim, moe_cfg, num_prefix_tokens)
        if moe_cfg.top_k not in (1, 2):
            raise ValueError(f"model.moe.top_k: DeepSpeed's gate supports 1 or 2, not {moe_cfg.top_k}")
        cf = moe_cfg.capacity_factor
        self.moe = MoE(
            hidden_size=dim,
            expert=Mlp(dim, hidden_dim),
            num_experts=moe_cfg.num_experts,
            ep_size=1,
            k=moe_cfg.top_k,
            capacity_factor=cf if cf is not None else 1.0,
            eval_capacity_factor=moe_cfg.eval_capacity_factor or (cf if cf is not None else 1.0),
            min_capacity=moe_cfg.min_capacity,
            drop_tokens=cf is not None,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, l_aux, counts = self.moe(x_TD)
        return y, l_aux, counts
