"""Expert parallelism applied to a single-device ViMoE after construction (torchtitan's order: build, then
parallelize).

For every MoE FFN, `parallelize`:
  1. wraps it in `DeepSpeedMoEAdapter`, a `deepspeed.moe.layer.MoE`. DeepSpeed switches on expert-aware gradient
     reduction (expert grads averaged over the expert-data-parallel group only), ZeRO's expert groups and per-expert
     checkpoint files only for modules of that class: a home-made layer would get none of it, silently;
  2. keeps only this rank's E / ep_size experts and tags their parameters as DeepSpeed expert parameters
     (`allreduce = False`, `group_name = ep_size_N`);
  3. makes the expert bank serialise per expert under DeepSpeed's key pattern
     (`deepspeed_moe.experts.deepspeed_experts.<id>.`), which is what lets a checkpoint load at another ep_size;
  4. swaps the local dispatcher for the all-to-all one once DeepSpeed has created the expert-parallel groups
     (`set_deepspeed_parallelism`, called by `deepspeed.initialize`).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups
from torch import nn

from vimoe_dist.model.moe.experts import GroupedExperts
from vimoe_dist.model.moe.layer import MoEFFN
from vimoe_dist.parallel.alltoall import AllToAllDispatcher

EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
PER_EXPERT_KEY = "deepspeed_experts"


class DeepSpeedMoEAdapter(DeepSpeedMoE):
    """Presents our MoE FFN to DeepSpeed as one of its MoE layers, without DeepSpeed's gate or experts.

    `MoE.__init__` is skipped on purpose: it would build DeepSpeed's own TopKGate and expert copies. The attributes
    the engine reads (num_experts, ep_size, expert_group_name, num_local_experts) are set here, and attribute reads
    the adapter does not know fall through to the wrapped layer (`aux_loss`, `last_stats`, ...).
    """

    def __init__(self, layer: MoEFFN, ep_size: int) -> None:
        nn.Module.__init__(self)
        self.deepspeed_moe = layer
        self.ep_size = ep_size
        self.num_experts = layer.num_experts
        self.num_local_experts = layer.num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["deepspeed_moe"], name)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by `deepspeed.initialize`: creates (or reuses) the expert groups, then dispatches over them."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )
        if self.ep_size > 1:
            group = groups._get_expert_parallel_group(self.expert_group_name)
            self.deepspeed_moe.dispatcher = AllToAllDispatcher(group, self.ep_size, self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deepspeed_moe(x)


def parallelize(model: nn.Module, ep_size: int) -> nn.Module:
    """Wraps every MoE FFN and shards its experts over the expert-parallel group of this rank (in place).

    Needs torch.distributed initialised; the rank's position in its expert-parallel group follows DeepSpeed's
    layout (consecutive ranks form a group), computed here before DeepSpeed creates the groups.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"parallel.ep_size: {ep_size} does not divide the world size {world}")
    ep_rank = rank % ep_size
    for block in getattr(model, "blocks", []):
        layer = block.mlp
        if not isinstance(layer, MoEFFN):
            continue
        if layer.num_experts % ep_size:
            raise ValueError(f"parallel.ep_size: {ep_size} does not divide model.moe.num_experts={layer.num_experts}")
        shard_experts(layer.experts, ep_rank, ep_size, f"ep_size_{ep_size}")
        block.mlp = DeepSpeedMoEAdapter(layer, ep_size)
    return model


def shard_experts(bank: GroupedExperts, ep_rank: int, ep_size: int, group_name: str) -> None:
    """Keeps experts [ep_rank * L, (ep_rank + 1) * L) of the bank and tags them as DeepSpeed expert parameters."""
    num_local = bank.num_experts // ep_size
    keep = slice(ep_rank * num_local, (ep_rank + 1) * num_local)
    for name in EXPERT_PARAMS:
        param = nn.Parameter(getattr(bank, name).detach()[keep].clone())
        param.allreduce = False
        param.group_name = group_name
        setattr(bank, name, param)
    bank.num_experts = num_local
    bank.register_state_dict_post_hook(_split_per_expert)
    bank.register_load_state_dict_pre_hook(_stack_per_expert)


def _split_per_expert(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """fc1_weight [L, H, D] -> deepspeed_experts.<i>.fc1_weight [H, D]: DeepSpeed saves one file per expert."""
    for name in EXPERT_PARAMS:
        stacked = state_dict.pop(prefix + name)
        for i in range(stacked.shape[0]):
            state_dict[f"{prefix}{PER_EXPERT_KEY}.{i}.{name}"] = stacked[i]


def _stack_per_expert(module: GroupedExperts, state_dict: dict, prefix: str, *args) -> None:
    """The inverse on load: DeepSpeed has already renamed global expert ids to this rank's local ids."""
    pattern = re.compile(rf"^{re.escape(prefix)}{PER_EXPERT_KEY}\.(\d+)\.(\w+)$")
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(prefix + PER_EXPERT_KEY)]:
        m = pattern.match(key)
        if m:
            found.setdefault(m.group(2), {})[int(m.group(1))] = state_dict.pop(key)
    for name, per_expert in found.items():
        state_dict[prefix + name] = torch.stack([per_expert[i] for i in sorted(per_expert)])
