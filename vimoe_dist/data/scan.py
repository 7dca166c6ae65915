"""Building a manifest by reading shards: for shards written by other tools, and for remote validation shards.

`vimoe data manifest SHARDS... --out FILE` writes it once; the loader falls back to this scan (with a warning)
when a split it must count has no manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from vimoe_dist.data.manifest import Manifest, ShardInfo
from vimoe_dist.data.tario import DEFAULT_HTTP_TIMEOUT_S, ShardReader
from vimoe_dist.data.transforms import LABEL_EXTS


def scan_shards(
    urls: list[str],
    split: str = "",
    relative_to: str | os.PathLike | None = None,
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
) -> Manifest:
    """Reads every shard once; counts samples and labels. Unreadable shards stop with the reader's error."""
    from vimoe_dist.errors import UserError

    shards, label_counts = [], []
    for url in urls:
        reader = ShardReader(url, http_timeout_s)
        for sample in reader:
            raw = next((sample[e] for e in LABEL_EXTS if e in sample), None)
            try:
                label = int(raw) if raw is not None else -1
            except ValueError:
                label = -1
            if label >= 0:
                label_counts.extend([0] * (label + 1 - len(label_counts)))
                label_counts[label] += 1
        if reader.error is not None:
            raise UserError(f"shard {url!r} is unreadable: {reader.error}")
        name = url
        if relative_to is not None and "://" not in url and not url.startswith("pipe:"):
            name = os.path.relpath(Path(url).resolve(), Path(relative_to).resolve())
        size = os.path.getsize(url) if os.path.isfile(url) else 0
        shards.append(ShardInfo(name, reader.num_seen, size))
    return Manifest(split=split, shards=shards, label_counts=label_counts, source="scan")
