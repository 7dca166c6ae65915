"""AdamW with weight-decay and layer-decay groups, split for DeepSpeed's expert parameters (parallel/engine.py);
timm's cosine schedule."""

from __future__ import annotations

import torch
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from vimoe_dist.config import TrainConfig
from vimoe_dist.parallel.engine import split_expert_groups


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """Biases, norms, tokens and position embeddings get no weight decay (timm's `no_weight_decay`); with
    `layer_decay` < 1 each block's lr is scaled by decay^(depth - block) (BEiT, used when fine-tuning DINOv2). Expert
    parameters go to groups of their own, as DeepSpeed's expert-aware reduction and ZeRO require."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if t.layer_decay < 1.0:
        groups = param_groups_layer_decay(model, weight_decay=t.weight_decay, no_weight_decay_list=skip,
                                          layer_decay=t.layer_decay)  # fmt: skip
    else:
        groups = param_groups_weight_decay(model, weight_decay=t.weight_decay, no_weight_decay_list=skip)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = t.lr * g["lr_scale"]
        g.setdefault("name", f"wd{g['weight_decay']}_s{g['lr_scale']:.4g}")
    groups = split_expert_groups([g for g in groups if g["params"]])
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> CosineLRScheduler:
    """Linear warmup then cosine to `min_lr`, per optimizer step; honours each group's `lr_scale`."""
    return CosineLRScheduler(
        optimizer,
        t_initial=t.steps,
        lr_min=t.min_lr,
        warmup_t=t.warmup_steps,
        warmup_lr_init=t.min_lr if t.warmup_steps else t.lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )
