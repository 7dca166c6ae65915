"""Files shipped inside the package, found through `importlib.resources` so that an installed wheel works outside
the checkout as well as in it.

The run configs live in `vimoe_dist/configs/` (the checkout's top-level `configs` is a link to it, so every
documented `--config configs/digits.yaml` keeps working there). A shipped config can also be named without a path:
`--config digits`, `--config vimoe_s14_imagenet`, `--config routers/soft`; the documented `configs/NAME.yaml` means the
shipped file too where no such file exists (outside the checkout). A file that exists always wins over a name, so a
user's own `digits.yaml` in the working directory is never shadowed.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

CONFIG_SUFFIXES = (".yaml", ".yml")


def configs_dir() -> Path:
    """The directory of the shipped configs (a wheel installs package data as plain files)."""
    return Path(os.fspath(resources.files("vimoe_dist").joinpath("configs")))


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every shipped config; the name is the path below `configs/` without its suffix."""
    root = configs_dir()
    found = (p for p in root.rglob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(found)}


def find_config(spec: str | os.PathLike) -> Path:
    """The file `--config SPEC` means: SPEC itself when it is a file, else the shipped config of that name.

    Raises:
        ConfigError: SPEC is neither; the message lists the shipped names.
    """
    path = Path(spec)
    if path.is_file():
        return path
    name = Path(spec).as_posix().removeprefix("configs/")
    for suffix in CONFIG_SUFFIXES:
        name = name.removesuffix(suffix)
    shipped = shipped_configs()
    if name in shipped:
        return shipped[name]
    from vimoe_dist.config import ConfigError  # config/load.py imports this module

    raise ConfigError(f"config {str(spec)!r} is neither a file nor a shipped config; shipped: {', '.join(shipped)}")
