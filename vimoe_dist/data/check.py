"""`check_data(cfg)`: every data check that needs no model, in one call, for the trainer (before it builds the model),
`vimoe launch --dry-run` and `vimoe config show`; and `class_names(cfg)` for whoever names classes (run directories,
`vimoe eval`, `vimoe analyze`).

Per split: the shards exist, match their manifests in size, and fit `model.num_classes` (`splits.resolve`). Across
splits: the class lists of train and val agree, and the val set holds no class the train set lacks (a model cannot
learn a class it never saw; a mismatch means the splits were written with different class orders). No shard is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vimoe_dist.atomic import write_atomic
from vimoe_dist.config import Config
from vimoe_dist.data.manifest import check_class_name
from vimoe_dist.data.splits import Split, class_difference, resolve
from vimoe_dist.errors import UserError

CLASSES_FILE = "classes.txt"


@dataclass
class SplitSummary:
    key: str
    num_shards: int
    num_samples: int | None  # None: some shard is in no manifest (remote shards, or written by another tool)
    manifests: list[str]

    def describe(self) -> str:
        samples = f"{self.num_samples:,} samples" if self.num_samples is not None else "samples not counted"
        return f"{self.key}: {self.num_shards:,} shards, {samples}"


@dataclass
class DataSummary:
    train: SplitSummary
    val: SplitSummary | None
    classes: list[str]  # class index -> name; empty when no manifest names them
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for start-up logs and `vimoe config show`."""
        parts = [self.train.describe()] + ([self.val.describe()] if self.val else [])
        return "; ".join(parts) + (f"; {len(self.classes):,} classes" if self.classes else "")


def check_data(cfg: Config) -> DataSummary:
    """Runs every data check that needs no model; raises a one-line `UserError` naming the key or file.

    Warnings (a pattern naming part of a data set) are logged and returned in the summary. Reads manifests and file
    sizes only, never a shard, so it costs milliseconds even for ImageNet.
    """
    if cfg.data.train is None:
        raise UserError("data.train: no training data; set it to the directory `vimoe data ... --out DIR` wrote")
    train = resolve(cfg, "data.train", need_counts=False)
    val = resolve(cfg, "data.val", need_counts=False) if cfg.data.val else None
    if val is not None:
        _check_splits_agree(train, val)
    classes = next((s.manifest.classes for s in (train, val) if s and s.manifest and s.manifest.classes), [])
    return DataSummary(
        train=_summary(train),
        val=_summary(val) if val else None,
        classes=list(classes),
        warnings=train.warnings + (val.warnings if val else []),
    )


def _summary(split: Split) -> SplitSummary:
    return SplitSummary(split.key, len(split.urls), split.num_samples, split.manifest_files)


def _check_splits_agree(train: Split, val: Split) -> None:
    t, v = train.manifest, val.manifest
    if t is None or v is None:
        return
    where_v = val.manifest_files[0] if val.manifest_files else "the val shards"
    where_t = train.manifest_files[0] if train.manifest_files else "the train shards"
    if t.classes and v.classes and t.classes != v.classes:
        raise UserError(
            f"data.val: {where_v!r} and {where_t!r} name different classes ({class_difference(v, t)}); write the val "
            f"split with `vimoe data from-folder ... --classes-from {where_t}`"
        )
    if not t.label_counts:
        return
    for i, n in enumerate(v.label_counts):
        if n and (i >= len(t.label_counts) or t.label_counts[i] == 0):
            name = f" {v.classes[i]!r}" if i < len(v.classes) else ""
            raise UserError(
                f"data.val: {where_v!r} has {n} samples of class {i}{name}, which the train split ({where_t!r}) lacks"
            )


def class_names(cfg: Config) -> list[str] | None:
    """The class names (index -> name) of the config's data set, or None when no manifest names them or they do not
    match `model.num_classes`. Looks at data.train, then data.val; a split that cannot be resolved is skipped (this
    names classes, it does not check data: the loaders report the errors)."""
    for key in ("data.train", "data.val"):
        if getattr(cfg.data, key.split(".")[1]) is None:
            continue
        try:
            manifest = resolve(cfg, key, need_counts=False).manifest
        except UserError:
            continue
        if manifest is not None and manifest.classes:
            return list(manifest.classes) if len(manifest.classes) == cfg.model.num_classes else None
    return None


def write_class_names(classes: list[str], path: str | os.PathLike) -> None:
    """`classes.txt`: one name per line, line i naming class i (names with line breaks are refused)."""
    for name in classes:
        check_class_name(name, str(path))
    write_atomic(path, "".join(f"{name}\n" for name in classes))
