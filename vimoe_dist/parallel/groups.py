"""The expert-parallel process groups, created or fetched through DeepSpeed's registry of groups.

DeepSpeed's engine reduces expert gradients over the expert-data-parallel group it finds under the name
`ep_size_N`, so our all-to-all must run on the expert-parallel group registered under the same name: this module is
the one place that touches DeepSpeed's (private) `deepspeed.utils.groups` functions for that. Its layout (the
"E + D" one): consecutive ranks form an expert-parallel group ([0, 1], [2, 3] for ep_size 2 on 4 ranks) and ranks
with the same position in their groups form an expert-data-parallel group ([0, 2], [1, 3]).
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.utils import groups

# DeepSpeed's "D + E" alternative layout (`use_data_before_expert_parallel_`) is not used: groups are created with
# the default, and the adapter checks that the engine asks for the same
DATA_BEFORE_EXPERT_PARALLEL = False


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed registers the groups of one ep_size under (and tags expert parameters with)."""
    return f"ep_size_{ep_size}"


def expert_parallel_group(ep_size: int) -> dist.ProcessGroup:
    """This rank's expert-parallel group of `ep_size` ranks, created with its expert-data-parallel companion on the
    first call (a collective: every rank must call it) and fetched afterwards. Needs DeepSpeed's process group
    (`vimoe_dist.parallel.init.init_distributed`)."""
    name = expert_group_name(ep_size)
    if not has_expert_parallel_group(ep_size):
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=DATA_BEFORE_EXPERT_PARALLEL)
    return groups._get_expert_parallel_group(name)


def has_expert_parallel_group(ep_size: int) -> bool:
    return expert_group_name(ep_size) in groups._get_expert_parallel_group_dict()


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's position in its expert-parallel group of `ep_size` ranks (0 when there is none)."""
    if not has_expert_parallel_group(ep_size):
        return 0
    return groups._get_expert_parallel_rank(expert_group_name(ep_size))
