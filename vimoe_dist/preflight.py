"""The checks `vimoe train` makes before it builds the model, in one function that needs no process group, no GPU
and no model, so that `vimoe config show` can run them on a login node before an allocation is spent.

Today: the config's own validation (already done by `load_config`), `check_config` of the trainer (training shards
configured, the pretrained file exists, fp16 only with CUDA), `check_layout` for the world size (ep_size, batch
split, routing groups), and the data paths of both splits (`resolve_split`: shards exist, labels fit
`model.num_classes`, sizes from the manifests). A new pre-build check (data manifests, devices, ...) belongs in
`preflight`: `vimoe config show` then runs it with no further change.
"""

from __future__ import annotations

from dataclasses import dataclass

from vimoe_dist.config import Config, check_layout


@dataclass
class SplitInfo:
    """What the checks learnt about one split without reading its shards."""

    num_shards: int
    num_samples: int | None  # from the manifests; None when no manifest lists every shard


@dataclass
class PreflightReport:
    world_size: int
    train: SplitInfo
    val: SplitInfo | None  # None: no data.val


def preflight(cfg: Config, world_size: int) -> PreflightReport:
    """Runs every check `vimoe train` makes before it builds the model, for a job of `world_size` ranks.

    Raises:
        UserError: the first check that fails (a `ConfigError` for a bad key or value), in one line naming the key.
    """
    from vimoe_dist.train.loop import check_config

    check_config(cfg)
    check_layout(cfg, world_size)
    train = _split(cfg, "data.train")
    val = _split(cfg, "data.val") if cfg.data.val else None
    return PreflightReport(world_size=world_size, train=train, val=val)


def _split(cfg: Config, key: str) -> SplitInfo:
    # need_counts=False: sizes come from the manifests only; counting unlisted shards would read the whole split
    from vimoe_dist.data.loader import resolve_split

    urls, counts, _ = resolve_split(cfg, key, need_counts=False)
    return SplitInfo(num_shards=len(urls), num_samples=sum(counts) if counts is not None else None)
