"""Resolving one split (`data.train` or `data.val`): its shards, their sample counts and the manifests behind them,
with every check that needs no model: shards that are missing or whose size differs from their manifest are one-line
errors, a pattern that names only part of a manifest's shards is a warning with the counts, labels must fit
`model.num_classes`. Imports no torch, so `vimoe config show` and `vimoe launch --dry-run` can run it cheaply.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vimoe_dist.config import Config
from vimoe_dist.data.manifest import MIN_SAMPLE_BYTES, Manifest, ShardInfo, manifests_in, shard_path
from vimoe_dist.data.sources import Source, expand_sources, is_local, local_path
from vimoe_dist.errors import UserError

log = logging.getLogger("vimoe_dist.data")


@dataclass
class Split:
    """What one of data.train / data.val resolves to."""

    key: str
    urls: list[str]
    counts: list[int] | None  # samples per shard, None when some shard is in no manifest
    manifest: Manifest | None  # the manifests behind the shards, merged (classes, label counts); or a scan
    manifest_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def resolve(cfg: Config, key: str, need_counts: bool) -> Split:
    """Resolves data.train or data.val (`key`); scans shards that no manifest counts only when `need_counts`."""
    spec = getattr(cfg.data, key.split(".")[1])
    sources = expand_sources(spec, key, cfg.data.allow_pipe)
    urls = [u for s in sources for u in s.urls]
    if key == "data.train":
        check_order(cfg, urls)
    known: dict[str, tuple[ShardInfo, Path]] = {}  # url -> its manifest entry and file
    used: dict[Path, Manifest] = {}
    warnings: list[str] = []
    for source in sources:
        if source.manifest is not None:
            used[source.manifest_file] = source.manifest
            for url, info in zip(source.urls, source.manifest.shards):
                known[url] = (info, source.manifest_file)
    pattern_urls = [u for s in sources if s.manifest is None for u in s.urls if is_local(u)]
    _match_patterns(pattern_urls, known, used, key, warnings)
    for url in urls:
        if url in known and is_local(url):
            _check_size(url, *known[url], key)
    manifest = _merge(list(used.items()), key) if used else None
    counts = [known[u][0].num_samples for u in urls] if all(u in known for u in urls) else None
    if counts is None and need_counts:
        from vimoe_dist.data.scan import scan_shards

        missing = [u for u in urls if u not in known]
        log.warning("%s: no manifest lists %d of the shards; counting their samples by reading them once",
                    key, len(missing))  # fmt: skip
        scanned = scan_shards(missing, split=key, http_timeout_s=cfg.data.http_timeout_s)
        for url, info in zip(missing, scanned.shards):
            known[url] = (info, Path("-"))
        manifest = _merge([*used.items(), (Path("-"), scanned)], key)
        counts = [known[u][0].num_samples for u in urls]
    split = Split(key, urls, counts, manifest, [str(f) for f in used], warnings)
    _check_labels(split, cfg)
    return split


def check_order(cfg: Config, urls: list[str]) -> None:
    """`data.order: exact` (the default) reads samples by random access into local, uncompressed tars; anything else
    is one line saying what to set, before a model is built or a rank waits for another."""
    if cfg.data.order != "exact":
        return
    unfit = next((u for u in urls if not is_local(u) or u.endswith((".gz", ".tgz"))), None)
    if unfit is not None:
        what = "local files" if not is_local(unfit) else "uncompressed tars"
        raise UserError(
            f"data.train: data.order=exact (the default) reads shards by random access and needs {what}, not "
            f"{unfit!r}; set data.order=stream to stream them (a resume then continues with fresh data, not the "
            "batches it would have had)"
        )


def _match_patterns(urls: list[str], known: dict, used: dict, key: str, warnings: list[str]) -> None:
    """Finds the manifests (in the shards' directories) that list shards named by patterns; warns when a pattern
    names only part of a manifest's shards."""
    wanted = {str(Path(u).resolve()): u for u in urls if u not in known}
    if not wanted:
        return
    for directory in sorted({Path(w).parent for w in wanted}):
        found = []
        for file, manifest in manifests_in(directory):
            listed = {str(Path(shard_path(directory, s.url)).resolve()): s for s in manifest.shards}
            found.append((file, manifest, listed, sum(w in wanted for w in listed) / max(len(listed), 1)))
        # the manifest that the pattern covers best first: the split's own, not a manifest of several splits
        for file, manifest, listed, _ in sorted(found, key=lambda f: -f[3]):
            named = {w: info for w, info in listed.items() if w in wanted and wanted[w] not in known}
            if not named:
                continue
            used[file] = manifest
            for w, info in named.items():
                known[wanted[w]] = (info, file)
            if len(named) < len(listed):
                samples = sum(i.num_samples for i in named.values())
                message = (
                    f"{key}: the shards named cover {len(named)} of the {len(listed)} shards of {str(file)!r} "
                    f"({samples} of {manifest.num_samples} samples); set {key}={directory} to use them all"
                )
                log.warning("%s", message)
                warnings.append(message)


def _check_size(url: str, info: ShardInfo, file: Path, key: str) -> None:
    try:
        size = os.path.getsize(local_path(url))
    except OSError as e:
        raise UserError(f"{key}: shard {url!r} cannot be read: {e.strerror or e}") from None
    if info.num_bytes and size != info.num_bytes:
        raise UserError(
            f"{key}: shard {url!r} is {size} bytes but {str(file)!r} says {info.num_bytes}; it was changed or "
            f"copied incompletely (rewrite the manifest with `vimoe data manifest` if the change is intended)"
        )
    if info.num_samples * MIN_SAMPLE_BYTES > size:
        raise UserError(f"{key}: shard {url!r} has {size} bytes, too few for the {info.num_samples} samples "
                        f"{str(file)!r} claims")  # fmt: skip


def _merge(manifests: list[tuple[Path, Manifest]], key: str) -> Manifest:
    """The class names (which must agree) and summed label counts of several manifests."""
    named = [(f, m) for f, m in manifests if m.classes]
    for (f0, m0), (f1, m1) in itertools.pairwise(named):
        if m1.classes != m0.classes:
            raise UserError(f"{key}: {str(f1)!r} and {str(f0)!r} name different classes; {class_difference(m1, m0)}")
    counts = [0] * max((len(m.label_counts) for _, m in manifests), default=0)
    for _, m in manifests:
        for i, n in enumerate(m.label_counts):
            counts[i] += n
    shards = [s for _, m in manifests for s in m.shards]
    first = manifests[0][1]
    return Manifest(first.split, shards, named[0][1].classes if named else [], counts, first.source)


def class_difference(a: Manifest, b: Manifest) -> str:
    """Where two class lists first differ, in words."""
    if len(a.classes) != len(b.classes):
        return f"{len(a.classes)} classes against {len(b.classes)}"
    i = next(i for i, (x, y) in enumerate(zip(a.classes, b.classes)) if x != y)
    return f"class {i} is {a.classes[i]!r} against {b.classes[i]!r}"


def _check_labels(split: Split, cfg: Config) -> None:
    manifest, key = split.manifest, split.key
    if manifest is None:
        return
    used = [i for i, n in enumerate(manifest.label_counts) if n] or [len(manifest.classes) - 1]
    if max(used) >= cfg.model.num_classes:
        raise UserError(
            f"{key}: the shards hold labels up to {max(used)} but model.num_classes={cfg.model.num_classes}"
        )
    if split.counts is not None and sum(split.counts) == 0:
        raise UserError(f"{key}: the shards hold no samples")


def resolve_split(cfg: Config, key: str, need_counts: bool) -> tuple[list[str], list[int] | None, Manifest | None]:
    """(shard URLs, samples per shard or None, merged manifest or None) of data.train / data.val."""
    split = resolve(cfg, key, need_counts)
    return split.urls, split.counts, split.manifest


__all__ = ["Source", "Split", "resolve", "resolve_split"]
