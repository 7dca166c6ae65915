"""What every router shares: an fp32 linear gate, V-MoE's gate noise and the weighted sum of auxiliary losses.

Shape legend: G groups, U units per group, D model dim, E experts.
"""

from __future__ import annotations

import math

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


def check_weight(name: str, value: float) -> float:
    """A loss weight or noise level must be a finite number >= 0; the error names the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def add_gate_noise(logits_GUE: torch.Tensor, noise_std: float, training: bool) -> torch.Tensor:
    """V-MoE's gate noise (Riquelme et al. 2021, eq. 2: softmax(W x + eps)): eps ~ N(0, (noise_std / E)^2) while
    training, nothing in evaluation. `noise_std` is relative to 1/E as in vmoe's routers (`noise_std = (1.0 /
    num_experts) * self.noise_std`), so one setting means the same perturbation of the softmax whatever E is."""
    if not training or noise_std == 0:
        return logits_GUE
    return logits_GUE + (noise_std / logits_GUE.shape[-1]) * torch.randn_like(logits_GUE)


class AuxLossWeights:
    """The configured weights of the auxiliary losses (`losses.py`); zero weights cost nothing."""

    def __init__(
        self,
        importance_loss: float = 0.0,
        load_loss: float = 0.0,
        switch_loss: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        self.importance = check_weight("importance_loss", importance_loss)
        self.load = check_weight("load_loss", load_loss)
        self.switch = check_weight("switch_loss", switch_loss)
        self.z = check_weight("z_loss", z_loss)

    def __call__(
        self,
        logits_GUE: torch.Tensor,
        probs_GUE: torch.Tensor,
        top1_GU: torch.Tensor | None = None,
        noisy_logits_GUE: torch.Tensor | None = None,
        top_k: int = 1,
        noise_std: float = 0.0,
    ) -> torch.Tensor:
        """`logits_GUE` noise-free (importance, z), `probs_GUE` the gates that route (Switch), `noisy_logits_GUE`
        and the relative `noise_std` for the load loss, which exists only while the gate is noisy (V-MoE App. A)."""
        total = logits_GUE.new_zeros(())
        if self.importance:
            total = total + self.importance * losses.importance_loss(logits_GUE)
        if self.load and noisy_logits_GUE is not None and noisy_logits_GUE is not logits_GUE and noise_std > 0:
            sigma = noise_std / logits_GUE.shape[-1]
            total = total + self.load * losses.load_loss(logits_GUE, noisy_logits_GUE, top_k, sigma)
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
