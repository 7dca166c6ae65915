"""Values derived from a config and checked against the job or the model rather than against the config alone: the
per-rank micro-batch size and the parallel layout on a given number of ranks (`check_layout`, which the trainer and
the launchers run: the world size is no part of the config), and the MoE block indices that `model.moe.layers`
names for a backbone of a given depth (`parse_layers`; `validate` checks its form without a depth).
"""

from __future__ import annotations

import re
from typing import Any

from vimoe_dist.config.coerce import _show
from vimoe_dist.config.schema import Config, ConfigError


def check_layout(cfg: Config, world: int) -> None:
    """The parallel layout must divide evenly on `world` ranks; the trainer checks it before the rendezvous and the
    launchers before they start any rank."""
    if world % cfg.parallel.ep_size:
        raise ConfigError(f"parallel.ep_size: {cfg.parallel.ep_size} does not divide the world size {world}")
    micro_batch_size(cfg, world)


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Images per rank per forward, train.global_batch_size / (world_size x train.grad_accum): the one definition (the
    data loaders, the DeepSpeed config and the layout check read it here). Routing groups never span ranks, so it
    must be a multiple of model.moe.group_size."""
    t, group = cfg.train, cfg.model.moe.group_size
    if t.global_batch_size % (world_size * t.grad_accum):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {t.grad_accum}"
        )
    micro = t.global_batch_size // (world_size * t.grad_accum)
    if micro % group:
        raise ConfigError(
            f"model.moe.group_size: {group} does not divide the per-rank micro-batch of {micro} images "
            f"(train.global_batch_size {t.global_batch_size} / {world_size} ranks / {t.grad_accum} accumulation)"
        )
    return micro


def parse_layers(layers: Any, depth: int | None) -> list[int]:
    """`last-L` or a list of block indices -> sorted block indices; checked against `depth` when given."""
    key = "model.moe.layers"
    if isinstance(layers, str):
        if not re.fullmatch(r"last-[0-9]{1,6}", layers):  # ASCII digits: str.isdigit() also takes '²'
            raise ConfigError(f"{key}: {_show(layers)} is neither 'last-L' nor a list of block indices")
        num = int(layers[5:])
        if depth is None:
            return []
        if num > depth:
            raise ConfigError(f"{key}: {layers!r} asks for more MoE blocks than the backbone's depth {depth}")
        return list(range(depth - num, depth))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"{key}: {_show(layers)} is neither 'last-L' nor a list of block indices")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{key}: {_show(list(layers))} names a block twice")
    if depth is not None:
        bad = [i for i in layers if not -depth <= i < depth]
        if bad:
            raise ConfigError(f"{key}: block {bad[0]} is beyond the backbone's depth {depth}")
        return sorted(i % depth for i in layers)
    return sorted(layers)
