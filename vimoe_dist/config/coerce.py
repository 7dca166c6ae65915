"""From YAML data to the schema's dataclasses: `from_dict` checks that every key exists and that every value has its
field's type (an int is a number, a float with an integral value an int, a list of the right length a tuple); string
keys hold no control characters and at most MAX_STRING_CHARS. `_show` is how every message of the package prints a
value: shortened by reprlib, so that an alias-expanded list or a long string never makes a huge message.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from typing import Any

from vimoe_dist.config.schema import ConfigError


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        first = min(unknown, key=repr)  # YAML keys may be numbers or null too, which do not sort with strings
        name = first if isinstance(first, str) and len(first) <= 60 and not _CONTROL.search(first) else _show(first)
        raise ConfigError(f"unknown config key '{prefix}{name}'; known in {where}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


MAX_STRING_CHARS = 4096  # a string key (a path at most: Linux's PATH_MAX)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no string key needs one; a newline or NUL in a path is hostile

_REPR = reprlib.Repr()  # values in messages: a few elements, levels and characters, always one short line
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def _show(value: Any) -> str:
    """`repr(value)` cut short: an alias-expanded list or a long string must not make a huge error message."""
    return _REPR.repr(value)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                if arg in (str, float) and isinstance(value, str if arg is str else (int, float)):
                    raise  # the right type, out of range or too long: that message says more than the type's name
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{key}: must be a finite number, got {_show(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        if len(value) > MAX_STRING_CHARS:
            raise ConfigError(f"{key}: longer than {MAX_STRING_CHARS} characters ({_show(value)})")
        if _CONTROL.search(value):
            raise ConfigError(f"{key}: control characters (newline, NUL, ...) are not allowed, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
