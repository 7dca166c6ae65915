"""The per-split manifest: which shards a split has, how many samples each holds, and the class names.

The loader reads it to know epoch sizes (for equal batch counts per rank and for `data.order: exact`) and to check
labels against `model.num_classes` before training starts. It is a small JSON file next to the shards,
`DIR/<split>.json`; shard names in it are relative to the manifest's directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vimoe_dist.errors import UserError

MANIFEST_FORMAT = "vimoe-wds-manifest/1"


@dataclass
class ShardInfo:
    url: str  # relative to the manifest's directory, or absolute / a URL
    num_samples: int
    num_bytes: int = 0


@dataclass
class Manifest:
    split: str
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)  # class index -> name
    label_counts: list[int] = field(default_factory=list)  # class index -> samples of this split
    source: str = ""  # what the writer read (digits, synthetic, a folder)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), len(self.label_counts))

    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "label_counts": self.label_counts,
            "source": self.source,
            "shards": [asdict(s) for s in self.shards],
        }

    def write(self, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)


def manifest_path(out_dir: str | os.PathLike, split: str) -> Path:
    return Path(out_dir) / f"{split}.json"


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads a manifest written by `Manifest.write`; a bad file is a `UserError` naming it."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"manifest {str(path)!r} cannot be read: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise UserError(f"manifest {str(path)!r} is not a {MANIFEST_FORMAT} file")
    try:
        shards = [ShardInfo(str(s["url"]), int(s["num_samples"]), int(s.get("num_bytes", 0))) for s in raw["shards"]]
        return Manifest(
            split=str(raw.get("split", "")),
            shards=shards,
            classes=[str(c) for c in raw.get("classes", [])],
            label_counts=[int(c) for c in raw.get("label_counts", [])],
            source=str(raw.get("source", "")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"manifest {str(path)!r} is malformed: {e!r}") from None


def is_manifest_file(path: Path) -> bool:
    """True for a JSON file that carries the manifest format marker (cheap: reads the first bytes only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return MANIFEST_FORMAT.encode() in head


def find_manifest(urls: list[str]) -> tuple[Manifest, dict[str, int]] | None:
    """The manifest(s) that list every one of `urls` (local shards only), merged, and url -> sample count.

    Looks at the `*.json` manifests in the directories of the shards; shards are matched by absolute path, so a
    list may mix shards of several splits or directories. Returns None when some shard is in no manifest (remote
    shards, or shards written by another tool: `vimoe data manifest` writes one).
    """
    if not urls or not all(_is_local(u) for u in urls):
        return None
    wanted = {str(Path(u).resolve()): u for u in urls}
    counts: dict[str, int] = {}
    used: list[Manifest] = []
    for directory in sorted({Path(w).parent for w in wanted}):
        for path in sorted(directory.glob("*.json")):
            if not is_manifest_file(path):
                continue
            manifest = read_manifest(path)
            listed = {str((directory / s.url).resolve()): s.num_samples for s in manifest.shards}
            new = {w: n for w, n in listed.items() if w in wanted and w not in counts}
            if new:
                counts.update(new)
                used.append(manifest)
    if not all(w in counts for w in wanted):
        return None
    merged = Manifest(
        split=used[0].split,
        shards=[ShardInfo(u, counts[w]) for w, u in wanted.items()],
        classes=max((m.classes for m in used), key=len),
        label_counts=_sum_counts([m.label_counts for m in used]),
        source=used[0].source,
    )
    return merged, {u: counts[w] for w, u in wanted.items()}


def _sum_counts(lists: list[list[int]]) -> list[int]:
    out = [0] * max((len(c) for c in lists), default=0)
    for counts in lists:
        for i, n in enumerate(counts):
            out[i] += n
    return out


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")
