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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vimoe_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
