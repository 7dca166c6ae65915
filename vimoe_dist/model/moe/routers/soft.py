"""Soft MoE routing (`soft`): every slot is a convex mix of all units, every unit a convex mix of all slot outputs.

Shape legend:
    G: routing groups   U: units per group   D: model dim   E: experts   S: slots per expert (the capacity C)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vimoe_dist.model.moe import losses
from vimoe_dist.model.moe.routers.base import SoftRouting
from vimoe_dist.model.moe.routers.common import as_groups, check_weight


def soft_slots(
    num_experts: int, slots_per_expert: int | None, capacity_factor: float | None, num_units: int | None
) -> int:
    """Slots per expert: `slots_per_expert`, else round(U * cf / E) as vmoe's `SoftRouter` (at least 1)."""
    if slots_per_expert is not None:
        if isinstance(slots_per_expert, bool) or not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(f"slots_per_expert: must be an integer >= 1, got {slots_per_expert!r}")
        return slots_per_expert
    if capacity_factor is None or num_units is None:
        raise ValueError(
            "slots_per_expert: Soft MoE needs slots_per_expert, or a capacity_factor and the units per routing group"
        )
    if not capacity_factor > 0 or not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_factor: must be a finite number > 0, got {capacity_factor!r}")
    slots = round(num_units * capacity_factor / num_experts)
    if slots < 1:
        raise ValueError(
            f"capacity_factor: round({num_units} units x {capacity_factor} / {num_experts} experts) = 0 slots per "
            "expert; Soft MoE needs at least 1 (raise it, or set slots_per_expert)"
        )
    return slots


class SoftMoE(nn.Module):
    """Soft MoE (Puigcerver et al., ICLR 2024, "From Sparse to Soft Mixtures of Experts"; `soft` in "Routers in
    Vision MoE", Liu et al., TMLR 2024; checked against vmoe's `projects/soft_moe/router.py`, `SoftRouter`).

    Steps, per routing group, in fp32:
      1. logits[u, (e, s)] = scale * <x_u / |x_u|, phi_(e,s) / |phi_(e,s)|>: slot parameters Phi [D, E*S] and a
         learned scalar scale (initialised to 1); normalising both sides is the paper's fix for logits that
         otherwise grow with the model dim and collapse the softmaxes to one-hot; while training, plus Gaussian
         noise of std `noise_std` (absolute, as in `SoftRouter.add_noise`: the logits are scaled cosines);
      2. dispatch D[u, e, s] = softmax over the units u of the group (each slot is a weighted average of units);
      3. combine C[u, e, s] = softmax over all E*S slots (each unit's output is a weighted average of slot outputs).
    Nothing is dropped and every expert processes exactly S slots per group. The gradient reaches Phi and the scale
    through both D and C.

    Slots per expert: `slots_per_expert` when given, else round(U * capacity_factor / E) for groups of U units
    (`num_units`), as `SoftRouter` computes `num_slots` (`compute_capacity(..., ceil_or_round='round')`: Python's
    round, halves to even; no top_k, Soft MoE has none). So E * S = U * capacity_factor slots per group.

    Auxiliary loss: only the router z-loss (on the noise-free logits, over slots) applies; Soft MoE is balanced by
    construction, so the importance, load and Switch losses are ignored (with a warning when their weight is set).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots_per_expert: int | None = None,
        capacity_factor: float | None = 1.0,
        num_units: int | None = None,
        noise_std: float = 0.0,
        importance_loss: float = 0.0,
        load_loss: float = 0.0,
        switch_loss: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__()
        ignored = {"importance_loss": importance_loss, "load_loss": load_loss, "switch_loss": switch_loss}
        for name, weight in ignored.items():
            if check_weight(name, weight):
                warnings.warn(
                    f"router soft: {name}={weight} is ignored (Soft MoE is balanced by construction)", stacklevel=2
                )
        self.num_experts, self.z_loss = num_experts, check_weight("z_loss", z_loss)
        self.slots_per_expert = soft_slots(num_experts, slots_per_expert, capacity_factor, num_units)
        self.noise_std = check_weight("noise_std", noise_std)
        self.phi = nn.Parameter(torch.empty(dim, num_experts * self.slots_per_expert))
        nn.init.normal_(self.phi, std=dim**-0.5)
        self.scale = nn.Parameter(torch.ones(1))  # shape [1], not []: DeepSpeed broadcasts parameters as bytes

    def forward(self, x: torch.Tensor) -> SoftRouting:
        x_GUD, squeeze = as_groups(x)
        G, U, _ = x_GUD.shape
        E, S = self.num_experts, self.slots_per_expert
        # fp32 whatever the training precision: the softmaxes over units and slots are as sensitive as a gate's
        with torch.autocast(device_type=x_GUD.device.type, enabled=False):
            x_GUD = F.normalize(x_GUD.float(), dim=-1)
            phi_DX = F.normalize(self.phi.float(), dim=0)
            logits_GUX = self.scale.float() * (x_GUD @ phi_DX)
            noisy_GUX = logits_GUX
            if self.training and self.noise_std > 0:
                noisy_GUX = logits_GUX + self.noise_std * torch.randn_like(logits_GUX)
            dispatch_GUES = noisy_GUX.softmax(dim=1).view(G, U, E, S)
            combine_GUES = noisy_GUX.softmax(dim=-1).view(G, U, E, S)
            aux = self.z_loss * losses.z_loss(logits_GUX) if self.z_loss else logits_GUX.new_zeros(())
        return SoftRouting(
            num_groups=G,
            num_units=U,
            num_experts=E,
            capacity=S,
            probs_GUE=combine_GUES.sum(-1),  # the share of each unit's output that comes from each expert
            aux_loss=aux,
            squeeze=squeeze,
            dispatch_weights_GUEC=dispatch_GUES,
            combine_weights_GUEC=combine_GUES,
        )
