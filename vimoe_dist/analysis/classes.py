"""Class names for the commands that report on a trained model (`vimoe eval`, `vimoe analyze routing`, `vimoe
prune`), and what `vimoe eval --per-class` makes of a confusion matrix.

Names come from the manifest of the data being evaluated (`vimoe_dist.data.class_names`: the data set written by
`vimoe data from-folder` names its classes), else from the run's `classes.txt` (written by the trainer next to its
`config.yaml`, so names survive a moved data set), else classes are their indices. A list that does not fit
`model.num_classes` is not used: a wrong name is worse than a number.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from vimoe_dist.config import Config
from vimoe_dist.data.check import CLASSES_FILE

if TYPE_CHECKING:
    import torch


def find_class_names(cfg: Config, checkpoint: str | Path | None = None) -> list[str] | None:
    """The class names (index -> name) for `cfg`'s model, or None when nothing names them."""
    from vimoe_dist.data import class_names

    names = class_names(cfg)
    if names is not None:
        return names
    if checkpoint is None:
        return None
    path = Path(checkpoint).resolve()
    start = path if path.is_dir() else path.parent
    for folder in (start, *list(start.parents)[:2]):  # RUN, RUN/checkpoints, RUN/checkpoints/TAG
        file = folder / CLASSES_FILE
        if file.is_file():
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
            return lines if len(lines) == cfg.model.num_classes else None
    return None


def name_of(names: list[str] | None, index: int) -> str:
    return names[index] if names is not None and index < len(names) else str(index)


def per_class_rows(confusion_CC: torch.Tensor, names: list[str] | None) -> list[dict]:
    """One row per class with images: its top-1 accuracy and the class it is most often mistaken for."""
    confusion = confusion_CC.double().cpu()
    rows = []
    for c in range(confusion.shape[0]):
        images = float(confusion[c].sum())
        if images == 0:
            continue
        wrong = confusion[c].clone()
        wrong[c] = 0
        other = int(wrong.argmax())
        rows.append(
            {
                "index": c,
                "class": name_of(names, c),
                "images": int(images),
                "top1": float(confusion[c, c]) / images,
                "confused_with": name_of(names, other) if wrong[other] > 0 else "",
                "confused_images": int(wrong[other]),
            }
        )
    return rows


def worst_classes(rows: list[dict], n: int = 5) -> list[dict]:
    """The `n` classes with the lowest top-1 (most images first among equals), for the one-line summary."""
    ranked = sorted(rows, key=lambda r: (r["top1"], -r["images"], r["index"]))[:n]
    return [{k: r[k] for k in ("class", "top1", "images", "confused_with")} for r in ranked]


def write_per_class(path: str | Path, rows: list[dict]) -> Path:
    """`index,class,images,top1,confused_with,confused_images`, one line per class, as CSV (names may hold commas)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["index", "class", "images", "top1", "confused_with", "confused_images"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "top1": f"{r['top1']:.4f}"} for r in rows)
    return path
