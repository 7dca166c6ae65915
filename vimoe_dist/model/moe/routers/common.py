"""What every router shares: an fp32 linear gate and the weighted sum of auxiliary losses.

Shape legend: G groups, U units per group, D model dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vimoe_dist.model.moe import losses


class LinearGate(nn.Module):
    """A bias-free linear gate evaluated in fp32 whatever the training precision: small logit differences decide
    routing, and bf16 rounding would flip them (Switch Transformer's "selective precision")."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def forward(self, x_GUD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_GUD.device.type, enabled=False):
            return F.linear(x_GUD.float(), self.weight.float())


class AuxLossWeights:
    """The configured weights of the auxiliary losses; zero weights cost nothing."""

    def __init__(
        self,
        importance_loss: float = 0.0,
        load_loss: float = 0.0,
        switch_loss: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        self.importance = importance_loss
        self.load = load_loss
        self.switch = switch_loss
        self.z = z_loss

    def __call__(
        self,
        logits_GUE: torch.Tensor,
        probs_GUE: torch.Tensor,
        top1_GU: torch.Tensor | None = None,
        noisy_logits_GUE: torch.Tensor | None = None,
        top_k: int = 1,
        noise_std: float = 0.0,
    ) -> torch.Tensor:
        total = logits_GUE.new_zeros(())
        if self.importance:
            total = total + self.importance * losses.importance_loss(probs_GUE)
        if self.load and noisy_logits_GUE is not None and noise_std > 0:
            total = total + self.load * losses.load_loss(logits_GUE, noisy_logits_GUE, top_k, noise_std)
        if self.switch:
            top1 = probs_GUE.argmax(-1) if top1_GU is None else top1_GU
            total = total + self.switch * losses.switch_loss(probs_GUE, top1)
        if self.z:
            total = total + self.z * losses.z_loss(logits_GUE)
        return total


def as_groups(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Routers take [T, D] (one group, the public contract) or [G, U, D]; returns [G, U, D] and whether to squeeze."""
    if x.dim() == 2:
        return x.unsqueeze(0), True
    if x.dim() != 3:
        raise ValueError(f"router input must be [T, D] or [G, U, D], got shape {tuple(x.shape)}")
    return x, False
