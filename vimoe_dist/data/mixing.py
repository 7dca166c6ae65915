"""Mixup / CutMix (timm's `Mixup`) applied per routing group, so that it does not depend on the number of ranks.

timm mixes a batch with its own reverse (image i with image b-1-i, one lambda per batch). Applied to a rank's
local batch that pairing would change with the number of ranks; applied to each routing group of
`model.moe.group_size` images (the unit DESIGN.md already makes layout-invariant), with numpy's RNG seeded from the
group's global index, the mixed images and soft targets are the same on 1 or 4 ranks.
"""

from __future__ import annotations

import torch

from vimoe_dist.config import Config
from vimoe_dist.data.transforms import global_rng, seed_from


class GroupMixup:
    """Mixup / CutMix over consecutive groups of `group_size` images (Zhang et al. 2018; Yun et al. 2019)."""

    def __init__(self, cfg: Config) -> None:
        from timm.data import Mixup

        self.group_size = cfg.model.moe.group_size
        self.seed = cfg.run.seed
        self.num_classes = cfg.model.num_classes
        self.mixup = Mixup(
            mixup_alpha=cfg.data.mixup,
            cutmix_alpha=cfg.data.cutmix,
            label_smoothing=cfg.train.label_smoothing,
            num_classes=cfg.model.num_classes,
        )

    def __call__(self, image: torch.Tensor, label: torch.Tensor, group_ids: list[int]) -> torch.Tensor:
        """Mixes `image` in place; returns soft targets [b, num_classes]. `group_ids[g]` is the global id of local
        group g (it seeds that group's lambda and box)."""
        targets = []
        for g, gid in enumerate(group_ids):
            sl = slice(g * self.group_size, (g + 1) * self.group_size)
            with global_rng(seed_from(self.seed, 0x6D6978, gid)):
                mixed, target = self.mixup(image[sl], label[sl])
            image[sl] = mixed  # timm mixes in place; the copy is for versions that return a new tensor
            targets.append(target)
        return torch.cat(targets).float()


def check_mixup(cfg: Config) -> None:
    from vimoe_dist.errors import UserError

    if (cfg.data.mixup > 0 or cfg.data.cutmix > 0) and cfg.model.moe.group_size % 2:
        raise UserError(
            f"data.mixup/data.cutmix pair images inside a routing group: model.moe.group_size="
            f"{cfg.model.moe.group_size} must be even"
        )
