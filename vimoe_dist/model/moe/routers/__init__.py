"""The router zoo, registered under the short names of "Routers in Vision MoE" (Liu et al., TMLR 2024)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from vimoe_dist.model.moe.registry import ROUTER_SPECS
from vimoe_dist.model.moe.routers.base import Routing, SoftRouting, SparseRouting, capacity
from vimoe_dist.model.moe.routers.expert_choice import ExpertChoice, ExpertChoiceSinkhorn
from vimoe_dist.model.moe.routers.soft import SoftMoE
from vimoe_dist.model.moe.routers.sparse_ot import ExpertChoiceSparse
from vimoe_dist.model.moe.routers.token_choice import TokenChoiceSinkhorn, TokenChoiceTopK

_CLASSES = {
    cls.__name__: cls
    for cls in (TokenChoiceTopK, TokenChoiceSinkhorn, ExpertChoice, ExpertChoiceSinkhorn, ExpertChoiceSparse, SoftMoE)
}
# names and options are defined once, torch-free, in registry.py (config validation reads them without torch)
ROUTERS: dict[str, type[nn.Module]] = {name: _CLASSES[spec.cls] for name, spec in ROUTER_SPECS.items()}


def router_options(name: str) -> set[str]:
    """The option names router `name` accepts (registry.py; a test keeps them equal to its constructor's)."""
    return set(ROUTER_SPECS[name].options)


def build_router(name: str, dim: int, num_experts: int, num_units: int | None = None, **options: Any) -> nn.Module:
    """Builds router `name`; called on x [T, D] (one group) or [G, U, D] it returns a `Routing`.

    `num_units`, the units per routing group, goes to the routers whose parameters depend on it (Soft MoE with its
    slots derived from `capacity_factor`) and is ignored by the others.
    """
    if name not in ROUTERS:
        raise ValueError(f"router: unknown router {name!r}; known: {', '.join(sorted(ROUTERS))}")
    unknown = sorted(set(options) - router_options(name))
    if unknown:
        raise ValueError(f"router {name}: unknown option {unknown[0]!r}")
    if "num_units" in inspect.signature(ROUTERS[name].__init__).parameters:
        options["num_units"] = num_units
    return ROUTERS[name](dim, num_experts, **options)


__all__ = ["ROUTERS", "Routing", "SoftRouting", "SparseRouting", "build_router", "capacity", "router_options"]
