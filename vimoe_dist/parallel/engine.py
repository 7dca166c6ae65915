"""The DeepSpeed engine around a parallelized model: the optimizer groups its expert-aware reduction needs, the
engine itself, and the way back from the engine to our model.

DeepSpeed is imported by the functions that use it, so that importing this module (train/checkpoint.py does, and
eval, export and analysis read checkpoints through that) costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def split_expert_groups(param_groups: list[dict]) -> list[dict]:
    """Moves the expert parameters (tagged by `parallelize`) of every optimizer group into groups of their own, one
    per expert-parallel size, with the group's settings (lr, weight decay, lr scale): ZeRO partitions and reduces
    expert and dense parameters over different process groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """`deepspeed.initialize` with our optimizer and DeepSpeed config (ds_config.py); returns the engine. The model
    must come out of `parallelize`: the engine then finds the expert-parallel groups made and calls the adapters'
    check."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def unwrap(engine) -> nn.Module:
    """The model inside a DeepSpeed engine (a model outside one is returned as it is); `vimoe_dist.model.moe_layers`
    of it gives the MoE FFNs, also inside their adapters."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return engine.module if isinstance(engine, DeepSpeedEngine) else engine
