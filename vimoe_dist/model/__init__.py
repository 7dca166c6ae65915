"""Single-device ViMoE: timm ViT + MoE FFNs. Imports torch and timm only - never torch.distributed, deepspeed,
webdataset or prometheus_client; parallelism is applied from outside (`vimoe_dist.parallel`).

Names are imported lazily, so that `vimoe_dist.model.moe.registry` (router names and options, read by config
validation) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MoEFFN": "vimoe_dist.model.moe.layer",
    "MoELayer": "vimoe_dist.model.moe.layer",
    "aux_loss": "vimoe_dist.model.build",
    "build_dense": "vimoe_dist.model.build",
    "build_model": "vimoe_dist.model.build",
    "build_moe": "vimoe_dist.model.build",
    "load_state_dict_file": "vimoe_dist.model.build",
    "moe_layers": "vimoe_dist.model.build",
    "upcycle": "vimoe_dist.model.build",
    "build_router": "vimoe_dist.model.moe.routers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vimoe_dist.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
