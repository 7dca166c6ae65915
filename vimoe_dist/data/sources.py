"""Turning `data.train` / `data.val` into shard URLs, with the one-line errors users need.

Accepted, alone or in a list:
- the directory `vimoe data ...` wrote: the split's manifest (`DIR/train.json` for data.train, `DIR/val.json` for
  data.val) names the shards, so the config cannot disagree with the data set about how many there are;
- a manifest file (`DIR/train.json`);
- a brace pattern (`train-{000000..001023}.tar`, expanded with webdataset's `braceexpand`) or a glob (local);
- `http(s)://` URLs and `pipe:` commands (a `pipe:` source runs a shell command, so it is refused unless
  `data.allow_pipe: true`, also when a manifest names it).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vimoe_dist.data.manifest import Manifest, manifest_path, read_manifest, shard_path
from vimoe_dist.errors import UserError

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "gs://", "s3://")


@dataclass
class Source:
    """One entry of data.train / data.val and the shards it names."""

    entry: str
    urls: list[str]
    manifest_file: Path | None = None  # set when the entry is a data set directory or a manifest
    manifest: Manifest | None = None


def is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES)


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def split_of(key: str) -> str | None:
    """`data.train` -> "train", `data.val` -> "val"; None for keys that name no split."""
    name = key.rsplit(".", 1)[-1]
    return name if key.startswith("data.") and name in ("train", "val") else None


def expand_shards(spec: Any, key: str, allow_pipe: bool) -> list[str]:
    """Every shard named by `spec`, in the order given (local shards must exist and be readable)."""
    return [url for source in expand_sources(spec, key, allow_pipe) for url in source.urls]


def expand_sources(spec: Any, key: str, allow_pipe: bool) -> list[Source]:
    """The entries of `spec` with their shards; data set directories and manifests are read and checked."""
    import braceexpand

    if spec is None or spec == "" or spec == []:
        example = (
            "the directory `vimoe data ... --out DIR` wrote, or a pattern such as 'DIR/train-{000000..000011}.tar'"
        )
        raise UserError(f"{key}: no shards given; set {key} to {example}")
    patterns = [spec] if isinstance(spec, str) else spec
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise UserError(f"{key}: expected a data set directory, a shard pattern or a list of them, got {spec!r}")
    sources: list[Source] = []
    for pattern in patterns:
        check_scheme(pattern, key, allow_pipe)
        if not is_local(pattern):
            sources.append(Source(pattern, list(braceexpand.braceexpand(pattern))))
            continue
        shards: list[str] = []
        for raw in braceexpand.braceexpand(pattern):
            path = local_path(raw)
            if os.path.isdir(path) or path.endswith(".json"):
                sources.append(_from_manifest(path, key, allow_pipe))
            else:
                shards.append(path)
        if shards:
            sources.append(Source(pattern, _expand_local(shards, key, pattern)))
    return sources


def check_scheme(url: str, key: str, allow_pipe: bool, where: str = "") -> None:
    """Refuses `pipe:` (unless allowed) and object-storage URLs; `where` names the manifest that listed `url`."""
    if url.startswith("pipe:") and not allow_pipe:
        raise UserError(
            f"{key}: {url!r}{where} runs a shell command; set data.allow_pipe=true to allow 'pipe:' sources"
        )
    if url.startswith(("gs://", "s3://")):
        raise UserError(f"{key}: {url!r}{where}: read object storage through 'pipe:' (e.g. 'pipe:aws s3 cp URL -')")


def _from_manifest(path: str, key: str, allow_pipe: bool) -> Source:
    """A data set directory (its split's manifest) or a manifest file."""
    if os.path.isdir(path):
        split = split_of(key)
        if split is None:
            raise UserError(f"{key}: {path!r} is a directory; name its shards (e.g. '{path}/train-*.tar')")
        file = manifest_path(path, split)
        if not file.is_file():
            raise UserError(
                f"{key}: {path!r} has no {split} manifest ({file.name}); write the data set with `vimoe data ... "
                f"--out {path}`, or the manifest with `vimoe data manifest '{path}/{split}-*.tar' --out {file}`"
            )
    else:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"{key}: manifest {path!r} does not exist")
    manifest = read_manifest(file)
    if not manifest.shards:
        raise UserError(f"{key}: manifest {str(file)!r} lists no shards")
    urls = [shard_path(file.parent, s.url) for s in manifest.shards]
    for url in urls:
        check_scheme(url, key, allow_pipe, f" (listed in {str(file)!r})")
        if is_local(url) and not os.path.exists(local_path(url)):
            raise UserError(f"{key}: shard {url!r} (listed in {str(file)!r}) does not exist")
        if is_local(url) and (not os.path.isfile(local_path(url)) or not os.access(local_path(url), os.R_OK)):
            raise UserError(f"{key}: shard {url!r} (listed in {str(file)!r}) is not a readable file")
    return Source(path, urls, file, manifest)


def _expand_local(paths: list[str], key: str, pattern: str) -> list[str]:
    out: list[str] = []
    for path in paths:
        out.extend(sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path])
    if not any(os.path.exists(p) for p in out):
        raise UserError(f"{key}: no shards match {pattern!r}")
    for path in out:
        if not os.path.exists(path):
            raise UserError(f"{key}: shard {path!r} (from {pattern!r}) does not exist")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise UserError(f"{key}: shard {path!r} is not a readable file")
    return out
