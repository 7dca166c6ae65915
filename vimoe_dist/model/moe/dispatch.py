"""The dispatcher seam: how rows already sorted by expert reach their experts and come back.

The MoE layer calls `dispatcher(x_XD, counts_E, experts) -> y_XD` (X rows in expert-major order, counts_E rows per
global expert). Locally that is a call of the bank; `vimoe_dist.parallel` swaps in an all-to-all dispatcher after
construction (torchtitan swaps token dispatchers the same way; vmoe separates routing from dispatch), so the model
never learns how many ranks there are.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Dispatcher(Protocol):
    def __call__(self, x_XD: torch.Tensor, counts_E: torch.Tensor, experts: nn.Module) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts live in this process."""

    def __call__(self, x_XD: torch.Tensor, counts_E: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        return experts(x_XD, counts_E)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
