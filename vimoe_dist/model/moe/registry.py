"""The router registry: the short names of "Routers in Vision Mixture of Experts" (Liu et al., TMLR 2024), the class
behind each name and the options each router takes. The one definition of both.

Torch-free on purpose: config validation (`vimoe_dist.config`, which also runs on login nodes before `vimoe launch`)
checks a router's name and options from here without importing torch; `routers/__init__.py` maps the class names to
the classes, and `build_moe` passes a router exactly the options listed here. `tests/unit/test_routers.py` checks
that each list equals the parameters of the router's constructor, so a new constructor option fails that test until
it is listed here; every option must also be a `model.moe.*` config key of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

# the auxiliary loss weights every router accepts (Soft MoE warns that the balancing ones do nothing for it)
LOSS_OPTIONS = ("importance_loss", "load_loss", "switch_loss", "z_loss")
# how many experts a unit may reach, and how many units an expert may take per routing group
CAPACITY_OPTIONS = ("top_k", "capacity_factor", "eval_capacity_factor", "min_capacity")


@dataclass(frozen=True)
class RouterSpec:
    """A registered router: its class name (in `vimoe_dist.model.moe.routers`) and the options it takes."""

    cls: str
    options: tuple[str, ...]


ROUTER_SPECS: dict[str, RouterSpec] = {
    "tc-softmax": RouterSpec("TokenChoiceTopK", (*CAPACITY_OPTIONS, "bpr", "renormalize", "noise_std", *LOSS_OPTIONS)),
    "tc-sinkhorn": RouterSpec(
        "TokenChoiceSinkhorn", (*CAPACITY_OPTIONS, "bpr", "renormalize", "noise_std", "sinkhorn_iters", *LOSS_OPTIONS)
    ),
    "ec-softmax": RouterSpec("ExpertChoice", (*CAPACITY_OPTIONS, "noise_std", *LOSS_OPTIONS)),
    "ec-sinkhorn": RouterSpec(
        "ExpertChoiceSinkhorn", (*CAPACITY_OPTIONS, "noise_std", "sinkhorn_iters", *LOSS_OPTIONS)
    ),
    "ec-sparse": RouterSpec(
        "ExpertChoiceSparse", (*CAPACITY_OPTIONS, "noise_std", "sparse_gamma", "sparse_iters", *LOSS_OPTIONS)
    ),
    # slots per expert: `slots_per_expert`, or round(U * capacity_factor / E) when it is null (vmoe's SoftRouter)
    "soft": RouterSpec("SoftMoE", ("slots_per_expert", "capacity_factor", "noise_std", *LOSS_OPTIONS)),
}

ROUTER_NAMES: tuple[str, ...] = tuple(sorted(ROUTER_SPECS))
# every option some router takes, in first-seen order: the `model.moe.*` keys that are router options
ALL_ROUTER_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for spec in ROUTER_SPECS.values() for o in spec.options))
