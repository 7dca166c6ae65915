"""`vimoe data from-folder`: image folders (ImageNet's layouts) to WebDataset shards.

Layouts read:
- `SRC/train/<class>/<image>` and optionally `SRC/val/...` (the ImageFolder tree), in one command;
- one split at a time with `--split`: `SRC` is then the split's folder itself (`ILSVRC2012_img_train/n01440764/...`);
- a validation split as ImageNet ships it, flat files plus a label file (`--labels`, see `labels.py`), or the class
  folders some preparation scripts make.

Each split becomes `DIR/<split>-%06d.tar` holding the original image bytes (no re-encoding: no quality loss, and the
writer is I/O-bound) under the extension of their real format (ImageNet has a PNG named .JPEG), `.cls` labels, and
`DIR/<split>.json`; `DIR/classes.txt` lists the class names, one per line, in the order of the train split's sorted
folder names (torchvision's ImageFolder order). Both splits always use the train split's classes: a split written on
its own takes them from `--classes-from` or from `DIR/train.json`. Training samples are shuffled once with a fixed
seed before sharding so that a shard is not one class (a streaming shuffle buffer cannot undo class-sorted shards);
validation stays sorted. The result does not depend on the number of writer processes, and an existing data set in
`DIR` is replaced only when the new one is complete (`staging.py`).
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from vimoe_dist.data.folderscan import IMAGE_EXTENSIONS, SkipLog, TreeWalker
from vimoe_dist.data.labels import classes_from as read_classes_from
from vimoe_dist.data.labels import read_label_file
from vimoe_dist.data.manifest import Manifest, manifest_path, read_manifest
from vimoe_dist.data.staging import StagedWrite
from vimoe_dist.data.writers import write_split
from vimoe_dist.errors import UserError

log = logging.getLogger("vimoe_dist.data")
SPLITS = ("train", "val")
CLASSES_FILE = "classes.txt"
# magic bytes -> the extension a decoder would expect
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


@dataclass(frozen=True)
class FolderItem:
    path: str
    key: str
    ext: str
    label: int


def _key_for(relative: str) -> str:
    """A tar key from `class/name.ext`: webdataset splits a member name at the first dot of its base name, so
    dots in the stem become underscores."""
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[.\s]", "_", stem)


def _ext_of(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()[1:]
    return "jpg" if ext == "jpeg" else ext


def sniff_ext(data: bytes, fallback: str) -> str:
    """The extension of the image format `data` really is (by its magic bytes), else `fallback`."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _SIGNATURES if data.startswith(magic)), fallback)


def _items(paths: list[str], root: Path, labels: dict[str, int]) -> list[FolderItem]:
    """FolderItems with unique keys (a.jpg and a.png of one class get two)."""
    items, used = [], set()
    for path in paths:
        key = base = _key_for(os.path.relpath(path, root))
        n = 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        items.append(FolderItem(path, key, _ext_of(path), labels[path]))
    return items


def list_class_folders(split_dir: Path, classes: list[str], skips: SkipLog) -> list[FolderItem]:
    """Every image under `split_dir/<class>/` (recursively), sorted by class then path."""
    index = {name: i for i, name in enumerate(classes)}
    walker = TreeWalker(split_dir, skips)
    paths, labels = [], {}
    for name in walker.class_dirs():
        if name not in index:
            raise UserError(f"{split_dir / name}: class {name!r} does not appear in the train split")
        for path in walker.image_files(split_dir / name):
            paths.append(path)
            labels[path] = index[name]
    return _items(paths, split_dir, labels)


def list_flat(split_dir: Path, label_file: Path, classes: list[str], skips: SkipLog) -> list[FolderItem]:
    """The images directly in `split_dir`, labelled by `label_file`."""
    paths = TreeWalker(split_dir, skips).image_files(split_dir, recursive=False)
    return _items(paths, split_dir, read_label_file(label_file, paths, classes))


def list_split(split_dir: Path, classes: list[str], labels: Path | None, skips: SkipLog) -> list[FolderItem]:
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: not a directory")
    if labels is not None:
        items = list_flat(split_dir, labels, classes, skips)
    else:
        items = list_class_folders(split_dir, classes, skips)
        if not items and TreeWalker(split_dir, SkipLog()).image_files(split_dir, recursive=False):
            raise UserError(f"{split_dir}: images without class folders; give their label file with --labels FILE")
    if not items:
        raise UserError(f"{split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return items


class _FileSample:
    """Picklable sample function: item i -> its original bytes (under their real format's extension) and label."""

    def __init__(self, items: list[FolderItem]) -> None:
        self.items = items

    def __call__(self, i: int) -> dict:
        item = self.items[i]
        with open(item.path, "rb") as f:
            data = f.read()
        return {"__key__": item.key, sniff_ext(data, item.ext): data, "cls": item.label}


def plan_splits(
    src: Path, out: Path, split: str | None, labels: Path | None, classes_from: Path | None
) -> tuple[dict[str, Path], list[str]]:
    """{split: folder} to write and the class list."""
    if split is None:
        if not (src / "train").is_dir():
            raise UserError(
                f"{src}: expected an ImageFolder tree with {src}/train/<class>/<image> (and optionally val/), or "
                f"name the split of a single folder with --split train|val"
            )
        folders = {s: src / s for s in SPLITS if (src / s).is_dir()}
        if labels is not None and "val" not in folders:
            raise UserError(f"--labels {labels}: {src} has no val/ folder to label")
    else:
        if split not in SPLITS:
            raise UserError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
        folders = {split: src}
        if labels is not None and split != "val":
            raise UserError("--labels: labels a flat val folder; the train split takes class folders")
    if classes_from is not None:
        classes = read_classes_from(classes_from)
    elif "train" in folders:
        classes = TreeWalker(folders["train"]).class_dirs() if folders["train"].is_dir() else []
        if not classes:
            raise UserError(f"{folders['train']}: no class directories")
    elif manifest_path(out, "train").is_file():
        classes = read_manifest(manifest_path(out, "train")).classes
    else:
        raise UserError(
            f"--split val: no train split in {out} to take the classes from; write train first or give "
            f"--classes-from TRAIN_DIR_OR_MANIFEST"
        )
    return folders, classes


def write_from_folder(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_count: int = 1000,
    max_size: float = 1e9,
    num_procs: int = 4,
    seed: int = 0,
    shuffle: bool = True,
    progress: bool = True,
    split: str | None = None,
    labels: str | os.PathLike | None = None,
    classes_from: str | os.PathLike | None = None,
) -> dict[str, Manifest]:
    """Writes the shards, `classes.txt` and one manifest per split (see the module docstring); returns the
    manifests. `split` names the split that `src` is (default: `src` holds train/ and val/)."""
    from vimoe_dist.data.check import write_class_names

    src, out = Path(src), Path(out_dir)
    labels_path = Path(labels) if labels is not None else None
    folders, classes = plan_splits(src, out, split, labels_path, Path(classes_from) if classes_from else None)
    skips = SkipLog()
    items = {
        name: list_split(folder, classes, labels_path if name == "val" else None, skips)
        for name, folder in folders.items()
    }
    skips.summary()
    for other in SPLITS:
        kept = manifest_path(out, other)
        if other not in folders and kept.is_file() and read_manifest(kept).classes != classes:
            log.warning("from-folder: %s names other classes than the %s written now; rewrite it too", kept,
                        "/".join(folders))  # fmt: skip
    manifests = {}
    with StagedWrite(out, list(folders)) as stage:
        write_class_names(classes, stage.dir / CLASSES_FILE)
        for name, split_items in items.items():
            if shuffle and name == "train":
                random.Random(seed).shuffle(split_items)
            sizes = [os.path.getsize(item.path) for item in split_items]
            manifests[name] = write_split(
                stage.dir, name, len(split_items), _FileSample(split_items), classes,
                max_count=max_count, sizes=sizes, max_size=max_size, num_procs=num_procs,
                source=f"folder:{folders[name].resolve()}", progress=progress,
            )  # fmt: skip
    return manifests
