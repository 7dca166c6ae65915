"""Soft MoE routing (`soft`): every slot is a convex mix of all units, every unit a convex mix of all slot outputs.

Shape legend:
    G: routing groups   U: units per group   D: model dim   E: experts   S: slots per expert (the capacity C)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vimoe_dist.model.moe import losses
from vimoe_dist.model.moe.routers.base import SoftRouting
from vimoe_dist.model.moe.routers.common import as_groups


class SoftMoE(nn.Module):
    """Soft MoE (Puigcerver et al., ICLR 2024, "From Sparse to Soft Mixtures of Experts"; `soft` in "Routers in
    Vision MoE", Liu et al., TMLR 2024).

    Steps, per routing group, in fp32:
      1. logits[u, (e, s)] = scale * <x_u / |x_u|, phi_(e,s) / |phi_(e,s)|>: slot parameters Phi [D, E*S] and a
         learned scalar scale (initialised to 1); normalising both sides is the paper's fix for logits that
         otherwise grow with the model dim and collapse the softmaxes to one-hot;
      2. dispatch D[u, e, s] = softmax over the units u of the group (each slot is a weighted average of units);
      3. combine C[u, e, s] = softmax over all E*S slots (each unit's output is a weighted average of slot outputs).
    Nothing is dropped and every expert processes exactly S slots per group. The gradient reaches Phi and the scale
    through both D and C.

    Auxiliary loss: only the router z-loss (on the combine logits, over slots) applies; Soft MoE is balanced by
    construction, so the importance, load and Switch losses are ignored (with a warning when their weight is set).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        importance_loss: float = 0.0,
        load_loss: float = 0.0,
        switch_loss: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__()
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert: must be >= 1, got {slots_per_expert!r}")
        ignored = {"importance_loss": importance_loss, "load_loss": load_loss, "switch_loss": switch_loss}
        for name, weight in ignored.items():
            if weight:
                warnings.warn(
                    f"router soft: {name}={weight} is ignored (Soft MoE is balanced by construction)", stacklevel=2
                )
        self.num_experts, self.slots_per_expert, self.z_loss = num_experts, slots_per_expert, z_loss
        self.phi = nn.Parameter(torch.empty(dim, num_experts * slots_per_expert))
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
            dispatch_GUES = logits_GUX.softmax(dim=1).view(G, U, E, S)
            combine_GUES = logits_GUX.softmax(dim=-1).view(G, U, E, S)
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
