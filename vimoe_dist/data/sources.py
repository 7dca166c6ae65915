"""Turning `data.train` / `data.val` into a list of shard URLs, with the one-line errors users need.

Accepted: a brace pattern (`train-{000000..001023}.tar`, expanded with webdataset's `braceexpand`), a glob or a
directory of `*.tar` (local), a list of any of these, `http(s)://` URLs and `pipe:` commands (opened by webdataset's
`gopen`). A `pipe:` source runs a shell command, so it is refused unless `data.allow_pipe: true`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from vimoe_dist.errors import UserError

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "gs://", "s3://")


def is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES)


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_shards(spec: Any, key: str, allow_pipe: bool) -> list[str]:
    """Every shard named by `spec` (in the order given; local shards must exist and be readable)."""
    import braceexpand

    if spec is None or spec == "" or spec == []:
        raise UserError(
            f"{key}: no shards given; set {key} to a shard pattern such as 'DIR/train-{{000000..000011}}.tar'"
        )
    patterns = [spec] if isinstance(spec, str) else spec
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{key}: expected a shard pattern or a list of them, got {spec!r}")
    urls: list[str] = []
    for pattern in patterns:
        if pattern.startswith("pipe:") and not allow_pipe:
            raise UserError(
                f"{key}: {pattern!r} runs a shell command; set data.allow_pipe=true to allow 'pipe:' sources"
            )
        if pattern.startswith(("gs://", "s3://")):
            raise UserError(f"{key}: {pattern!r}: read object storage through 'pipe:' (e.g. 'pipe:aws s3 cp URL -')")
        expanded = list(braceexpand.braceexpand(pattern))
        if is_local(pattern):
            expanded = _expand_local(expanded, key, pattern)
        urls.extend(expanded)
    return urls


def _expand_local(paths: list[str], key: str, pattern: str) -> list[str]:
    out: list[str] = []
    for raw in paths:
        path = local_path(raw)
        if any(c in path for c in "*?["):
            out.extend(sorted(glob.glob(path)))
        elif os.path.isdir(path):
            out.extend(sorted(str(p) for p in Path(path).glob("*.tar")))
        else:
            out.append(path)
    existing = [p for p in out if os.path.exists(p)]
    if not existing:
        raise UserError(f"{key}: no shards match {pattern!r}")
    for path in out:
        if not os.path.exists(path):
            raise UserError(f"{key}: shard {path!r} (from {pattern!r}) does not exist")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise UserError(f"{key}: shard {path!r} is not a readable file")
    return out
