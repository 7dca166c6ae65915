"""Our MoE FFN presented to DeepSpeed as one of its MoE layers.

DeepSpeed switches on expert-aware gradient reduction (expert gradients averaged over the expert-data-parallel group
only), ZeRO's expert groups and per-expert checkpoint files only for modules that are instances of
`deepspeed.moe.layer.MoE`: a home-made layer gets none of it, silently. The adapter is such an instance that owns
our layer (under the child name DeepSpeed's key patterns expect, `deepspeed_moe`) and forwards to it; it has none
of DeepSpeed's gate or experts. Everything of our layer is read from `adapter.layer` (or found by
`vimoe_dist.model.moe_layers`), never through the adapter.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from vimoe_dist.model.moe.layer import MoEFFN
from vimoe_dist.parallel.checkpoint_layout import WRAPPED_LAYER
from vimoe_dist.parallel.groups import DATA_BEFORE_EXPERT_PARALLEL, expert_group_name, has_expert_parallel_group


class DeepSpeedMoEAdapter(DeepSpeedMoE):
    """A `deepspeed.moe.layer.MoE` around our MoE FFN, built by `parallelize` after the experts are sharded.

    `MoE.__init__` is skipped on purpose: it would build DeepSpeed's own TopKGate and expert copies. The attributes
    the engine reads (num_experts, ep_size, expert_group_name, num_local_experts) are set here.
    """

    def __init__(self, layer: MoEFFN, ep_size: int) -> None:
        nn.Module.__init__(self)
        self.add_module(WRAPPED_LAYER, layer)
        self.ep_size = ep_size
        self.num_experts = layer.num_experts
        self.num_local_experts = layer.num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

    @property
    def layer(self) -> MoEFFN:
        """The wrapped MoE FFN."""
        return self._modules[WRAPPED_LAYER]

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by `deepspeed.initialize`. `parallelize` has already created the groups and installed the
        all-to-all dispatcher on them: this only checks that the engine agrees with that layout."""
        if use_data_before_expert_parallel_ != DATA_BEFORE_EXPERT_PARALLEL:
            raise RuntimeError("parallel: DeepSpeed asks for another expert/data group layout than parallelize made")
        if not has_expert_parallel_group(self.ep_size):
            raise RuntimeError(f"parallel: no {self.expert_group_name} group: call parallelize before the engine")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
