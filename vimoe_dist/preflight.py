"""The checks `vimoe train` makes before it builds the model, in one function that needs no process group, no GPU
and no model, so that `vimoe config show` can run them on a login node before an allocation is spent.

Today: the config's own validation (already done by `load_config`), `check_config` of the trainer (training shards
configured, the pretrained file exists, fp16 only with CUDA), `check_layout` for the world size (ep_size, batch
split, routing groups), and the data of both splits (`vimoe_dist.data.check_data`: shards exist and match their
manifests, labels fit `model.num_classes`, the splits' class lists agree, sizes from the manifests). A new pre-build
check (devices, ...) belongs in `preflight`: `vimoe config show` then runs it with no further change.
"""

from __future__ import annotations

from dataclasses import dataclass

from vimoe_dist.config import Config, check_layout
from vimoe_dist.data.check import DataSummary, SplitSummary, check_data


@dataclass
class PreflightReport:
    world_size: int
    data: DataSummary  # what the data checks learnt without reading a shard: sizes, class names, warnings

    @property
    def train(self) -> SplitSummary:
        return self.data.train

    @property
    def val(self) -> SplitSummary | None:  # None: no data.val
        return self.data.val


def preflight(cfg: Config, world_size: int) -> PreflightReport:
    """Runs every check `vimoe train` makes before it builds the model, for a job of `world_size` ranks.

    Raises:
        UserError: the first check that fails (a `ConfigError` for a bad key or value), in one line naming the key.
    """
    from vimoe_dist.train.setup import check_config

    check_config(cfg)
    check_layout(cfg, world_size)
    return PreflightReport(world_size=world_size, data=check_data(cfg))
