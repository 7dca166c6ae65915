"""The router zoo, registered under the short names of "Routers in Vision MoE" (Liu et al., TMLR 2024)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from vimoe_dist.model.moe.routers.base import Routing, SoftRouting, SparseRouting, capacity
from vimoe_dist.model.moe.routers.expert_choice import ExpertChoice, ExpertChoiceSinkhorn
from vimoe_dist.model.moe.routers.soft import SoftMoE
from vimoe_dist.model.moe.routers.sparse_ot import ExpertChoiceSparse
from vimoe_dist.model.moe.routers.token_choice import TokenChoiceSinkhorn, TokenChoiceTopK

ROUTERS: dict[str, type[nn.Module]] = {
    "tc-softmax": TokenChoiceTopK,
    "tc-sinkhorn": TokenChoiceSinkhorn,
    "ec-softmax": ExpertChoice,
    "ec-sinkhorn": ExpertChoiceSinkhorn,
    "ec-sparse": ExpertChoiceSparse,
    "soft": SoftMoE,
}


def router_options(name: str) -> set[str]:
    """The option names router `name` accepts (its constructor's and its bases')."""
    names: set[str] = set()
    for cls in ROUTERS[name].__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module):
            continue
        params = inspect.signature(cls.__init__).parameters
        names |= {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY or v.kind is v.POSITIONAL_OR_KEYWORD}
    # num_units is not an option but a fact of the layer (see build_router)
    return (names | {"importance_loss", "load_loss", "switch_loss", "z_loss"}) - {
        "self",
        "dim",
        "num_experts",
        "num_units",
    }


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
