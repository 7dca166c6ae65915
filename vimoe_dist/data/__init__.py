"""WebDataset shards: writers (digits, synthetic, from an ImageFolder tree) and the streaming train/val loaders.

Names are imported lazily so that `vimoe --help` (which imports `vimoe_dist.data.cli`) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "write_digits": "vimoe_dist.data.digits",
    "read_manifest": "vimoe_dist.data.manifest",
    "Manifest": "vimoe_dist.data.manifest",
    "check_data": "vimoe_dist.data.check",
    "class_names": "vimoe_dist.data.check",
    "DataSummary": "vimoe_dist.data.check",
    "write_class_names": "vimoe_dist.data.check",
    "build_train_loader": "vimoe_dist.data.loader",
    "build_val_loader": "vimoe_dist.data.loader",
    "micro_batch_size": "vimoe_dist.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vimoe_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
