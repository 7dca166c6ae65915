"""Reading YAML, config files with their `base:` overlays (a path relative to the including file) and `key=value`
overrides (values parsed as YAML scalars), into plain data; hostile input is refused before anything runs. YAML,
from a file or an override, is capped in size (MAX_YAML_BYTES), in values once aliases are expanded (MAX_YAML_NODES:
an alias bomb is a few hundred bytes) and in nesting (MAX_YAML_DEPTH), checked on the parser's events before any
object is built; floats such as `1e-3`, which YAML 1.1 reads as strings, are numbers. A file is read without blocking
(a FIFO or device is refused), and a chain of `base:` files is at most MAX_BASE_CHAIN long and never loops.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from vimoe_dist.config.coerce import _CONTROL, _show
from vimoe_dist.config.schema import ConfigError

MAX_YAML_BYTES = 256 * 1024  # one config file or one override; the shipped configs are under 2 KiB
MAX_YAML_NODES = 10_000  # values and collections, aliases counted at their expanded size
MAX_YAML_DEPTH = 32  # nested collections (the schema needs 4; backbone_kwargs a few more)
MAX_BASE_CHAIN = 16  # files in one chain of `base:` overlays

_YAML_LOADER_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


class _ConfigLoader(_YAML_LOADER_BASE):
    """PyYAML's safe loader (no tags that build Python objects), also reading YAML 1.2 floats written without a dot
    or without an exponent sign (`1e-3`, `5E4`) as numbers: YAML 1.1, which PyYAML follows, makes them strings."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str | bytes, what: str) -> Any:
    """Parses one YAML document after checking its size, expanded size and depth (an alias bomb or deep nesting is
    refused from the parser's events, before any object is built)."""
    if isinstance(text, str):  # what libyaml reads; a command-line argument may hold undecodable bytes
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"{what}: not UTF-8 text (character {e.start + 1} is {_show(text[e.start])})") from None
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what}: larger than {MAX_YAML_BYTES // 1024} KiB")
    _check_yaml_shape(text, what)
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_reason(e)}") from None
    except (ValueError, OverflowError) as e:  # an integer beyond Python's digit limit, a date like 2024-13-01
        raise ConfigError(f"{what}: cannot read a value ({_first_line(e)})") from None
    finally:
        loader.dispose()


def _check_yaml_shape(text: bytes, what: str) -> None:
    """Counts nodes with every alias expanded (the billion-laughs bomb is a few hundred bytes of aliases) and the
    nesting depth (the composer recurses per level) over the parser's event stream, which holds nothing deep."""
    total = 0
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, total before it) per collection not yet closed
    sizes: dict[str, int] = {}  # anchor -> expanded size of its node
    try:
        for event in yaml.parse(text, Loader=_YAML_LOADER_BASE):
            if isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for anchor, _ in open_nodes):
                    raise ConfigError(f"{what}: alias *{_show(event.anchor)} refers to a node that contains it")
                total += sizes.get(event.anchor, 1)  # an undefined alias: the composer names it below
            elif isinstance(event, yaml.ScalarEvent):
                total += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                open_nodes.append((event.anchor, total))
                total += 1
                if len(open_nodes) > MAX_YAML_DEPTH:
                    raise ConfigError(f"{what}: nested deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = total - before
            if total > MAX_YAML_NODES:
                raise ConfigError(f"{what}: more than {MAX_YAML_NODES} values once its aliases are expanded")
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_reason(e)}") from None


def _yaml_reason(e: BaseException) -> str:
    """What PyYAML found wrong and where, in one line (its message starts with the context, e.g. 'while parsing')."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return _first_line(ValueError(e.problem)) + where
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _show_path(path: Path) -> str:
    """A file name in a message: whole (the user has to find the file), unless it is absurdly long."""
    text = str(path)
    return repr(text) if len(text) <= 1000 else _show(text)


def _read_config_file(path: Path) -> bytes:
    """The file's bytes, at most MAX_YAML_BYTES; a FIFO or device is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"config file {_show_path(path)} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise ConfigError(f"config file {_show_path(path)}: {getattr(e, 'strerror', None) or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {_show_path(path)} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config file {_show_path(path)}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"config file {_show_path(path)}: larger than {MAX_YAML_BYTES // 1024} KiB")
    return data


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    """The file's mapping over its `base:` file's (a path relative to the including file's directory, or absolute;
    `..` is allowed: the router overlays in configs/routers/ use it)."""
    if len(seen) >= MAX_BASE_CHAIN:
        raise ConfigError(f"config file {_show_path(path)}: more than {MAX_BASE_CHAIN} files chained through 'base'")
    text = _read_config_file(path)
    if path.resolve() in seen:
        raise ConfigError(f"config file {_show_path(path)} includes itself through 'base'")
    data = _load_yaml(text, f"config file {_show_path(path)}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {_show_path(path)} must hold a mapping, not {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip() or _CONTROL.search(base):
        raise ConfigError(f"config file {_show_path(path)}: base: {_show(base)} is not a file name")
    merged = _read_yaml_with_bases(path.parent / base, (*seen, path.resolve()))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "backbone_kwargs":
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {_show(key)}: {_show(part)} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value); values are YAML scalars or flow collections, read under the same caps
    as a config file."""
    if len(item) > MAX_YAML_BYTES:
        raise ConfigError(f"override {_show(item)}: longer than {MAX_YAML_BYTES // 1024} KiB")
    if "=" not in item:
        raise ConfigError(f"override {_show(item)} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {_show(item)}: {_show(key)} is not a dotted config key")
    if key.count(".") >= MAX_YAML_DEPTH:
        raise ConfigError(f"override {_show(key)}: nested deeper than {MAX_YAML_DEPTH} levels")
    value = _load_yaml(text, f"override {key}") if text.strip() else None
    return key, value
