"""The router registry (`vimoe_dist/model/moe/registry.py`) is the one definition of router names and options: it
must say what the constructors take, and config validation must refuse an option the chosen router ignores."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from torch import nn

from vimoe_dist.config import ConfigError, MoEConfig, load_config
from vimoe_dist.model.moe.registry import ALL_ROUTER_OPTIONS, ROUTER_NAMES, ROUTER_SPECS
from vimoe_dist.model.moe.routers import ROUTERS


def constructor_options(cls: type) -> set[str]:
    """The keyword parameters of a router's constructor and of its bases' (a `**kw` passes on to the base); the
    loss weights arrive through `**loss_weights` to `AuxLossWeights`, whose parameters are read instead. `num_units`
    (the units per routing group) is a fact of the layer that `build_router` passes, not a config option."""
    from vimoe_dist.model.moe.routers.common import AuxLossWeights

    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if any(p.kind is p.VAR_KEYWORD and p.name == "loss_weights" for p in params):
            names |= set(inspect.signature(AuxLossWeights.__init__).parameters) - {"self"}
    return names - {"self", "dim", "num_experts", "num_units"}


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_the_registry_lists_exactly_what_the_constructor_takes(name):
    assert set(ROUTER_SPECS[name].options) == constructor_options(ROUTERS[name])


def test_router_names_come_from_the_registry():
    assert tuple(sorted(ROUTERS)) == ROUTER_NAMES
    assert all(ROUTERS[name].__name__ == spec.cls for name, spec in ROUTER_SPECS.items())


def test_every_router_option_is_a_config_key():
    keys = {f.name for f in dataclasses.fields(MoEConfig)}
    assert set(ALL_ROUTER_OPTIONS) <= keys


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.moe.router=tc-softmax", "model.moe.sinkhorn_iters=5"], "model.moe.sinkhorn_iters"),
        (["model.moe.router=soft", "model.moe.top_k=1"], "model.moe.top_k"),
        (["model.moe.router=ec-softmax", "model.moe.renormalize=true"], "model.moe.renormalize"),
        (["model.moe.router=ec-sinkhorn", "model.moe.sparse_iters=3"], "model.moe.sparse_iters"),
        (["model.moe.router=tc-softmax", "model.moe.slots_per_expert=2"], "model.moe.slots_per_expert"),
    ],
)
def test_an_option_the_router_ignores_is_a_one_line_error(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert msg.startswith(key) and overrides[0].split("=")[1] in msg and "\n" not in msg


def test_options_the_router_takes_and_defaults_of_the_others_load():
    load_config(None, ["model.moe.router=tc-sinkhorn", "model.moe.sinkhorn_iters=5", "model.moe.renormalize=true"])
    load_config(None, ["model.moe.router=soft", "model.moe.slots_per_expert=2", "model.moe.top_k=2"])  # the default
    load_config(None, ["model.moe.router=ec-sparse", "model.moe.sparse_gamma=0.5", "model.moe.top_k=1"])
