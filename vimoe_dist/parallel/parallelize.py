"""Expert parallelism applied to a single-device ViMoE after construction, in one explicit step (torchtitan's order:
build, then parallelize).

For every MoE FFN, `parallelize`:
  1. takes this rank's expert-parallel group (created on the first call) and its position in it from the group;
  2. keeps only this rank's E / ep_size experts and tags their parameters as DeepSpeed expert parameters
     (`allreduce = False`, `group_name = ep_size_N`), which DeepSpeed's optimizer groups and ZeRO need;
  3. makes the expert bank serialise one expert per key under DeepSpeed's pattern (checkpoint_layout.py), which is
     what lets a checkpoint load at another ep_size;
  4. installs the all-to-all dispatcher on that group: from here on, the layer's forward sends each token's rows to
     the rank that owns its expert and back (alltoall.py);
  5. wraps the layer in `DeepSpeedMoEAdapter`, so that `deepspeed.initialize` treats it as an MoE layer.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from vimoe_dist.model import moe_layers
from vimoe_dist.model.moe.experts import GroupedExperts
from vimoe_dist.model.moe.layer import MoEFFN
from vimoe_dist.parallel.adapter import DeepSpeedMoEAdapter
from vimoe_dist.parallel.alltoall import AllToAllDispatcher
from vimoe_dist.parallel.checkpoint_layout import EXPERT_PARAMS, split_per_expert, stack_per_expert
from vimoe_dist.parallel.groups import expert_group_name, expert_parallel_group


def parallelize(model: nn.Module, ep_size: int) -> nn.Module:
    """Shards the experts of every MoE FFN over this rank's expert-parallel group and moves tokens between the group's
    ranks with all-to-all (in place; see the module docstring). A collective: every rank calls it, after
    `init_distributed` and before `deepspeed.initialize`."""
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"parallel.ep_size: {ep_size} does not divide the world size {world}")
    layers = moe_layers(model)
    if not layers:
        return model  # a dense model (model.moe.layers=last-0): plain data parallelism
    group = expert_parallel_group(ep_size)
    ep_rank = dist.get_rank(group)
    for i, layer in layers.items():
        if not isinstance(layer, MoEFFN):
            raise TypeError(f"parallelize: the MoE FFN of block {i} is a {type(layer).__name__}, not ours (MoEFFN)")
        if layer.num_experts % ep_size:
            raise ValueError(f"parallel.ep_size: {ep_size} does not divide model.moe.num_experts={layer.num_experts}")
        shard_experts(layer.experts, ep_rank, ep_size)
        if ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(group, ep_size, layer.num_experts)
        model.blocks[i].mlp = DeepSpeedMoEAdapter(layer, ep_size)
    return model


def shard_experts(bank: GroupedExperts, ep_rank: int, ep_size: int) -> None:
    """Keeps experts [ep_rank * L, (ep_rank + 1) * L) of the bank and tags them as DeepSpeed expert parameters."""
    num_local = bank.num_experts // ep_size
    keep = slice(ep_rank * num_local, (ep_rank + 1) * num_local)
    for name in EXPERT_PARAMS:
        param = nn.Parameter(getattr(bank, name).detach()[keep].clone())
        param.allreduce = False
        param.group_name = expert_group_name(ep_size)
        setattr(bank, name, param)
    bank.num_experts = num_local
    bank.register_state_dict_post_hook(split_per_expert)
    bank.register_load_state_dict_pre_hook(stack_per_expert)
