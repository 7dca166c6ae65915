"""`vimoe data from-folder SRC --out DIR`: an ImageFolder tree (ImageNet's layout) to WebDataset shards.

`SRC/train/<class>/<image>` and `SRC/val/<class>/<image>` become `DIR/{train,val}-%06d.tar` holding the original
image bytes (no re-encoding: no quality loss, and the writer is I/O-bound) with `.cls` labels, plus
`DIR/classes.txt` (class index -> directory name, one per line, the torchvision ImageFolder order: sorted names of
the train split) and a manifest per split. Training samples are shuffled once with a fixed seed before sharding so
that a shard is not one class (a streaming shuffle buffer cannot undo class-sorted shards); validation stays
sorted. The result does not depend on the number of writer processes.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from vimoe_dist.data.manifest import Manifest
from vimoe_dist.data.writers import write_split
from vimoe_dist.errors import UserError

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class FolderItem:
    path: str
    key: str
    ext: str
    label: int


def list_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _key_for(relative: str) -> str:
    """A tar key from `class/name.ext`: webdataset splits a member name at the first dot of its base name, so
    dots in the stem become underscores."""
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[.\s]", "_", stem)


def list_items(split_dir: Path, classes: list[str]) -> list[FolderItem]:
    """Every image under `split_dir/<class>/` (recursively), sorted by class then path."""
    index = {name: i for i, name in enumerate(classes)}
    items: list[FolderItem] = []
    used: set[str] = set()
    for name in list_classes(split_dir):
        if name not in index:
            raise UserError(f"{split_dir / name}: class {name!r} does not appear in the train split")
        root = split_dir / name
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for filename in sorted(filenames):
                ext = os.path.splitext(filename)[1].lower()
                if ext not in IMAGE_EXTENSIONS:
                    continue
                path = os.path.join(dirpath, filename)
                key = base = _key_for(os.path.relpath(path, split_dir))
                n = 1
                while key in used:  # a.jpg and a.png in one class
                    key, n = f"{base}_{n}", n + 1
                used.add(key)
                ext = "jpg" if ext == ".jpeg" else ext[1:]
                items.append(FolderItem(path, key, ext, index[name]))
    return items


class _FileSample:
    """Picklable sample function: item i -> its original bytes and label."""

    def __init__(self, items: list[FolderItem]) -> None:
        self.items = items

    def __call__(self, i: int) -> dict:
        item = self.items[i]
        with open(item.path, "rb") as f:
            data = f.read()
        return {"__key__": item.key, item.ext: data, "cls": item.label}


def write_from_folder(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_count: int = 1000,
    max_size: float = 1e9,
    num_procs: int = 4,
    seed: int = 0,
    shuffle: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Writes the shards, `classes.txt` and one manifest per split found under `src`; returns the manifests."""
    src = Path(src)
    present = [s for s in SPLITS if (src / s).is_dir()]
    if "train" not in present:
        raise UserError(f"{src}: expected an ImageFolder tree with {src}/train/<class>/<image> (and optionally val/)")
    classes = list_classes(src / "train")
    if not classes:
        raise UserError(f"{src / 'train'}: no class directories")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    manifests = {}
    for split in present:
        items = list_items(src / split, classes)
        if not items:
            raise UserError(f"{src / split}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        if shuffle and split == "train":
            random.Random(seed).shuffle(items)
        sizes = [os.path.getsize(item.path) for item in items]
        manifests[split] = write_split(
            out, split, len(items), _FileSample(items), classes,
            max_count=max_count, sizes=sizes, max_size=max_size, num_procs=num_procs,
            source=f"folder:{src.resolve()}", progress=progress,
        )  # fmt: skip
    return manifests
