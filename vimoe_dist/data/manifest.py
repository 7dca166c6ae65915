"""The per-split manifest: which shards a split has, how many samples each holds, and the class names.

The loader reads it to know epoch sizes (for equal batch counts per rank and for `data.order: exact`) and to check
labels against `model.num_classes` before training starts. It is a small JSON file next to the shards,
`DIR/<split>.json`; shard names in it are relative to the manifest's directory. `data.train: DIR` names a data set
by its directory: the split's manifest then lists the shards, so a config never disagrees with the data set about
how many shards there are.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vimoe_dist.atomic import write_atomic
from vimoe_dist.errors import UserError

MANIFEST_FORMAT = "vimoe-wds-manifest/1"
MAX_MANIFEST_BYTES = 256 << 20  # ImageNet-21k's is a few MB
MIN_SAMPLE_BYTES = 512  # a sample is at least one tar header
MAX_SHARD_SAMPLES = 1 << 24  # 16.7 M samples of >= 1 KiB would be a 16 GiB shard; real ones hold thousands


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
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")


def manifest_path(out_dir: str | os.PathLike, split: str) -> Path:
    return Path(out_dir) / f"{split}.json"


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads and checks a manifest written by `Manifest.write`; a bad file is a one-line `UserError` naming it.

    A manifest is input like any other: counts must be integers >= 0 that fit the bytes of their shard (a sample
    takes at least one 512-byte tar header), so a manifest claiming 2**40 or -100 samples is refused here instead
    of becoming a 2**40-element permutation or duplicate samples in exact order.
    """
    where = f"manifest {str(path)!r}"
    try:
        if os.stat(path).st_size > MAX_MANIFEST_BYTES:
            raise UserError(f"{where} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; is it a manifest?")
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{where} cannot be read: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{where} is not a {MANIFEST_FORMAT} file")
    shards_raw = raw.get("shards")
    if not isinstance(shards_raw, list) or not all(isinstance(s, dict) for s in shards_raw):
        raise UserError(f"{where}: 'shards' must be a list of {{url, num_samples, num_bytes}} objects")
    shards = []
    for i, item in enumerate(shards_raw):
        url = item.get("url")
        if not isinstance(url, str) or not url or has_control_chars(url):
            raise UserError(f"{where}: shard {i}: url {url!r} is not a file name or URL")
        num = _count(item.get("num_samples"), f"{where}: shard {url!r}: num_samples")
        size = _count(item.get("num_bytes", 0), f"{where}: shard {url!r}: num_bytes")
        room = size // MIN_SAMPLE_BYTES if size else MAX_SHARD_SAMPLES
        if num > min(room, MAX_SHARD_SAMPLES):
            limit = (
                f"its {size} bytes hold at most {room}"
                if room < MAX_SHARD_SAMPLES
                else f"at most {MAX_SHARD_SAMPLES} per shard"
            )
            raise UserError(f"{where}: shard {url!r} claims {num} samples; {limit}")
        shards.append(ShardInfo(url, num, size))
    manifest = Manifest(split=str(raw.get("split", "")), shards=shards, source=str(raw.get("source", "")))
    if "num_samples" in raw and _count(raw["num_samples"], f"{where}: num_samples") != manifest.num_samples:
        raise UserError(f"{where}: num_samples {raw['num_samples']} is not the sum over its shards")
    classes = raw.get("classes", [])
    if not isinstance(classes, list):
        raise UserError(f"{where}: 'classes' must be a list of names")
    for name in classes:
        check_class_name(name, where)
    manifest.classes = list(classes)
    counts = raw.get("label_counts", [])
    if not isinstance(counts, list):
        raise UserError(f"{where}: 'label_counts' must be a list of counts")
    manifest.label_counts = [_count(n, f"{where}: label_counts[{i}]") for i, n in enumerate(counts)]
    if classes and len(counts) > len(classes):
        raise UserError(f"{where}: label_counts has {len(counts)} entries for {len(classes)} classes")
    if sum(manifest.label_counts) > manifest.num_samples:
        raise UserError(f"{where}: label_counts add up to more than its {manifest.num_samples} samples")
    return manifest


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{what}: {value!r} is not a count >= 0")
    return value


def has_control_chars(text: str) -> bool:
    """True when `text` holds a line break or another control character (which would split a line of classes.txt
    or a log line in two)."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def check_class_name(name: object, where: str) -> None:
    """A class name is a non-empty string on one line; raises a one-line `UserError` naming `where` otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: class name {name!r} is not a non-empty string")
    if has_control_chars(name):
        raise UserError(f"{where}: class name {name!r} holds a line break or control character")


def is_manifest_file(path: Path) -> bool:
    """True for a JSON file that carries the manifest format marker (cheap: reads the first bytes only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return MANIFEST_FORMAT.encode() in head


def manifests_in(directory: Path) -> list[tuple[Path, Manifest]]:
    """Every manifest (`*.json` with the format marker) in `directory`, read and checked."""
    return [(path, read_manifest(path)) for path in sorted(directory.glob("*.json")) if is_manifest_file(path)]


def shard_path(manifest_dir: Path, url: str) -> str:
    """A manifest's shard name as a path or URL: relative names are relative to the manifest's directory."""
    if "://" in url or url.startswith("pipe:") or os.path.isabs(url):
        return url
    return str(manifest_dir / url)
