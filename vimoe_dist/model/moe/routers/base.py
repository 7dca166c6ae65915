"""The unified routing formulation of "Routers in Vision Mixture of Experts" (Liu et al., TMLR 2024).

A router looks at the units of one routing group (tokens, or whole images under image-level routing) and decides a
dispatch tensor D and a combine tensor C, both [units, experts, slots]: D[u, e, c] = 1 when unit u fills slot c of
expert e (or, for Soft MoE, the weight of u in that slot), C[u, e, c] the weight of that slot's output in u's result.
Sparse routers keep only the non-zero entries of D and C as index lists; Soft MoE keeps them dense because dense
mixing is its algorithm. Both know how to move rows to the experts (`gather`) and back (`scatter`), so the MoE layer
and the dispatchers never see which kind they hold.

Shape legend:
    G: routing groups            U: units per group (tokens, or images for image routing)
    R: rows (tokens) per unit    D: model dim
    E: experts                   C: slots per expert per group (the capacity)
    A: kept (unit, expert) assignments over all groups
    X: rows in expert-major order (sum over experts of their row counts)
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch


def capacity(num_units: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int) -> int:
    """Slots per expert per group: ceil(k * U * cf / E), at least `min_capacity`, at most U (dropless: U)."""
    if capacity_factor is None:
        return num_units
    cap = math.ceil(top_k * num_units * capacity_factor / num_experts)
    return max(1, min(num_units, max(min_capacity, cap)))


@dataclass
class Routing(abc.ABC):
    """Base of a routing decision over G groups of U units each; see the module docstring."""

    num_groups: int
    num_units: int
    num_experts: int
    capacity: int
    probs_GUE: torch.Tensor  # fp32 gate probabilities, for statistics and analysis
    aux_loss: torch.Tensor
    squeeze: bool = field(default=False, repr=False)  # the router was called on one group [T, D]

    @property
    def dispatch(self) -> torch.Tensor:
        """Dense D: [T, E, C] for a router called on one group, else [G, U, E, C]."""
        d = self.dispatch_GUEC()
        return d[0] if self.squeeze else d

    @property
    def combine(self) -> torch.Tensor:
        """Dense C: [T, E, C] for a router called on one group, else [G, U, E, C]."""
        c = self.combine_GUEC()
        return c[0] if self.squeeze else c

    @abc.abstractmethod
    def dispatch_GUEC(self) -> torch.Tensor:
        """Dense [G, U, E, C]."""

    @abc.abstractmethod
    def combine_GUEC(self) -> torch.Tensor:
        """Dense [G, U, E, C]."""

    @abc.abstractmethod
    def gather(self, x_GURD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for the experts in expert-major order, x_XD, and the row count of each expert, counts_E."""

    @abc.abstractmethod
    def scatter(self, y_XD: torch.Tensor, shape_GURD: torch.Size) -> torch.Tensor:
        """The experts' rows combined back into unit outputs, y_GURD."""

    def unit_expert_weights(self) -> torch.Tensor:
        """[G*U, E]: the combine weight each unit gives each expert's output (0 where not routed)."""
        return self.combine_GUEC().sum(-1).flatten(0, 1)

    def units_per_expert(self) -> torch.Tensor:
        """[E]: units each expert processes (filled slots), counted over all groups."""
        return (self.dispatch_GUEC() > 0).sum(dim=(0, 1, 3))

    def dropped_units(self) -> torch.Tensor:
        """Units that reach no expert at all (they keep only the residual and the shared expert)."""
        return ((self.dispatch_GUEC() > 0).flatten(2).sum(-1) == 0).sum()


@dataclass
class SparseRouting(Routing):
    """Index form: assignment a sends unit `unit_A[a]` (flat over groups) to slot `slot_A[a]` of `expert_A[a]`.

    Assignments are sorted by expert, then group, then slot: the expert-major order the experts and the all-to-all
    need. `weight_A` carries the gradient to the router.
    """

    unit_A: torch.Tensor = None  # long, in [0, G*U)
    expert_A: torch.Tensor = None  # long, in [0, E)
    slot_A: torch.Tensor = None  # long, in [0, C)
    weight_A: torch.Tensor = None  # float

    @staticmethod
    def from_choices(
        unit_A: torch.Tensor,
        expert_A: torch.Tensor,
        slot_A: torch.Tensor,
        weight_A: torch.Tensor,
        **kw,
    ) -> SparseRouting:
        """Sorts arbitrary-order kept assignments into expert-major order."""
        num_units = kw["num_units"]
        key = (expert_A * kw["num_groups"] + unit_A // num_units) * kw["capacity"] + slot_A
        order = torch.argsort(key)
        return SparseRouting(
            unit_A=unit_A[order], expert_A=expert_A[order], slot_A=slot_A[order], weight_A=weight_A[order], **kw
        )

    def _dense(self, values_A: torch.Tensor) -> torch.Tensor:
        G, U, E, C = self.num_groups, self.num_units, self.num_experts, self.capacity
        out = values_A.new_zeros(G * U, E, C)
        out[self.unit_A, self.expert_A, self.slot_A] = values_A
        return out.view(G, U, E, C)

    def dispatch_GUEC(self) -> torch.Tensor:
        return self._dense(torch.ones_like(self.weight_A))

    def combine_GUEC(self) -> torch.Tensor:
        return self._dense(self.weight_A)

    def gather(self, x_GURD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, U, R, D = x_GURD.shape
        x_XD = x_GURD.reshape(G * U, R * D).index_select(0, self.unit_A).view(-1, D)
        counts_E = torch.bincount(self.expert_A, minlength=self.num_experts) * R
        return x_XD, counts_E

    def scatter(self, y_XD: torch.Tensor, shape_GURD: torch.Size) -> torch.Tensor:
        G, U, R, D = shape_GURD
        y_ARD = y_XD.view(-1, R, D) * self.weight_A.to(y_XD.dtype)[:, None, None]
        out = y_XD.new_zeros(G * U, R, D).index_add_(0, self.unit_A, y_ARD)
        return out.view(G, U, R, D)

    def unit_expert_weights(self) -> torch.Tensor:
        out = self.weight_A.new_zeros(self.num_groups * self.num_units, self.num_experts)
        return out.index_put_((self.unit_A, self.expert_A), self.weight_A, accumulate=True)

    def units_per_expert(self) -> torch.Tensor:
        return torch.bincount(self.expert_A, minlength=self.num_experts)

    def dropped_units(self) -> torch.Tensor:
        reached = torch.zeros(self.num_groups * self.num_units, dtype=torch.bool, device=self.unit_A.device)
        reached[self.unit_A] = True
        return (~reached).sum()


@dataclass
class SoftRouting(Routing):
    """Dense form (Soft MoE): every slot is a convex mix of the group's units, every unit a mix of slot outputs."""

    dispatch_weights_GUEC: torch.Tensor = None  # softmax over units, per slot
    combine_weights_GUEC: torch.Tensor = None  # softmax over slots, per unit

    def dispatch_GUEC(self) -> torch.Tensor:
        return self.dispatch_weights_GUEC

    def combine_GUEC(self) -> torch.Tensor:
        return self.combine_weights_GUEC

    def gather(self, x_GURD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, U, R, D = x_GURD.shape
        d = self.dispatch_weights_GUEC.to(x_GURD.dtype)
        slots_EGCRD = torch.einsum("gurd,guec->egcrd", x_GURD, d)
        E, C = self.num_experts, self.capacity
        counts_E = torch.full((E,), G * C * R, dtype=torch.long, device=x_GURD.device)
        return slots_EGCRD.reshape(-1, D), counts_E

    def scatter(self, y_XD: torch.Tensor, shape_GURD: torch.Size) -> torch.Tensor:
        G, U, R, D = shape_GURD
        y_EGCRD = y_XD.view(self.num_experts, G, self.capacity, R, D)
        c = self.combine_weights_GUEC.to(y_XD.dtype)
        return torch.einsum("egcrd,guec->gurd", y_EGCRD, c)

    def units_per_expert(self) -> torch.Tensor:
        # every slot mixes all units: count slots x units as "processed", which is what the expert computes on
        return torch.full(
            (self.num_experts,), self.num_groups * self.capacity, dtype=torch.long, device=self.probs_GUE.device
        )

    def dropped_units(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.long, device=self.probs_GUE.device)
