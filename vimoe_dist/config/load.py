"""`load_config` and `save_config`: the whole way from a file (or a shipped config's name) and `key=value` overrides
to a validated `Config`: YAML with its `base:` overlays (yaml_io.py), the overrides, the dataclasses (coerce.py),
the checks (validation.py); and back to a `config.yaml`. Loading also drops the retired key `model.moe.impl`, which
the `config.yaml` of an older run still holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vimoe_dist.config.coerce import from_dict
from vimoe_dist.config.schema import Config, ConfigError, to_dict
from vimoe_dist.config.validation import validate
from vimoe_dist.config.yaml_io import _read_yaml_with_bases, _set_dotted, parse_override
from vimoe_dist.resources import find_config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML file or shipped config (following `base:` overlays), applies `key=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml_with_bases(find_config(path), seen=())
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    _drop_retired_impl(raw)
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _drop_retired_impl(raw: dict) -> None:
    """`model.moe.impl` left the config: the trainer builds our MoE layer only, and DeepSpeed's and fairscale's
    layers are comparison baselines that `vimoe bench moe` and the parity tests pass as layer factories. The
    `config.yaml` of an older run still says `impl: vimoe`, which is dropped; any other value is refused."""
    model = raw.get("model")
    moe = model.get("moe") if isinstance(model, dict) else None
    if isinstance(moe, dict) and "impl" in moe:
        impl = moe.pop("impl")
        if impl != "vimoe":
            raise ConfigError(
                f"model.moe.impl: {impl!r} cannot be trained; DeepSpeed's and fairscale's layers are comparison "
                "baselines (`vimoe bench moe`): remove the key"
            )


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
