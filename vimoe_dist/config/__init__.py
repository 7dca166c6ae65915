"""The configuration: dataclasses, YAML loading, dot-list overrides and validation.

One YAML file holds a run, given as a path or as the name of a shipped config (`digits`, `vimoe_s14_imagenet`: see
vimoe_dist/resources.py); `configs/*.yaml` may start with `base: other.yaml` to overlay another file (a path
relative to the including file). Overrides on the command line use the same dotted paths
(`model.moe.num_experts=16`); their values are parsed as YAML scalars. Every bad key or value raises `ConfigError`, a
one-line `ValueError` that names the key and the value (shortened: a value is never printed whole).

    schema.py      the dataclasses (RunConfig ... Config), `ConfigError`, `to_dict`
    load.py        `load_config` (file, overlays, overrides, dataclasses, checks) and `save_config`
    yaml_io.py     YAML files and overrides, capped against hostile input; `base:` chains, `parse_override`
    coerce.py      `from_dict`: YAML data to dataclasses, every key and type checked; `_show` for messages
    bounds.py      BOUNDS: the allowed range of every numeric key
    validation.py  `validate`: choices, checks across keys, router options, `parallel.deepspeed`
    derived.py     the micro-batch size and layout on a number of ranks, `parse_layers`
    cli.py         `vimoe config show|list` (imported by vimoe_dist/cli.py only: it reads data and devices)

Import every name from `vimoe_dist.config` itself (`__all__`): the files are how it is written, not its interface.
"""

from __future__ import annotations

from vimoe_dist.config.bounds import (
    BOUNDS,
    MAX_BATCH,
    MAX_EXPERTS,
    MAX_ITERS,
    MAX_RANKS,
    MAX_SEED,
    MAX_STEPS,
    MAX_TIMEOUT_S,
    Bound,
)
from vimoe_dist.config.coerce import MAX_STRING_CHARS, from_dict
from vimoe_dist.config.derived import check_layout, micro_batch_size, parse_layers
from vimoe_dist.config.load import load_config, save_config
from vimoe_dist.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    MetricsConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
    to_dict,
)
from vimoe_dist.config.validation import (
    DATA_ORDERS,
    DEEPSPEED_OWNED,
    DEEPSPEED_SECTIONS,
    POOL_MODES,
    PRECISIONS,
    ROUTING_MODES,
    WANDB_MODES,
    check_router_options,
    router_option_resets,
    validate,
)
from vimoe_dist.config.yaml_io import (
    MAX_BASE_CHAIN,
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    parse_override,
)
from vimoe_dist.config.yaml_io import _ConfigLoader as _ConfigLoader  # private: for the tests of what YAML reads
from vimoe_dist.model.moe.registry import ROUTER_NAMES

__all__ = [
    "BOUNDS",
    "DATA_ORDERS",
    "DEEPSPEED_OWNED",
    "DEEPSPEED_SECTIONS",
    "MAX_BASE_CHAIN",
    "MAX_BATCH",
    "MAX_EXPERTS",
    "MAX_ITERS",
    "MAX_RANKS",
    "MAX_SEED",
    "MAX_STEPS",
    "MAX_STRING_CHARS",
    "MAX_TIMEOUT_S",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "POOL_MODES",
    "PRECISIONS",
    "ROUTER_NAMES",
    "ROUTING_MODES",
    "WANDB_MODES",
    "Bound",
    "Config",
    "ConfigError",
    "DataConfig",
    "MetricsConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "WandbConfig",
    "check_layout",
    "check_router_options",
    "from_dict",
    "load_config",
    "micro_batch_size",
    "parse_layers",
    "parse_override",
    "router_option_resets",
    "save_config",
    "to_dict",
    "validate",
]
