"""Class lists and label files for `vimoe data from-folder`: ImageNet's validation split as it is shipped.

ImageNet's val archive unpacks to 50,000 flat files; the labels come separately. Read here:
- a CSV `file,label` (a header line is allowed), label a class name; Kaggle's `LOC_val_solution.csv`
  (`ImageId,PredictionString`, the class first in the prediction string, the file named without extension) reads
  as it is, because a label is the first word of its field and a file may be named by its stem;
- a whitespace-separated `file label` list (Caffe's `val.txt`), labels as class names or as class indices.

Classes of a split written on its own come from the train split (`--classes-from`: a data set directory, a manifest,
a `classes.txt` or the train class folders), so both splits always map a class to the same index.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from vimoe_dist.data.manifest import check_class_name, manifest_path, read_manifest
from vimoe_dist.errors import UserError

MAX_LABEL_FILE_BYTES = 64 << 20  # ImageNet's val CSV is 2 MB (Kaggle's with boxes: 9 MB)


def classes_from(path: str | os.PathLike) -> list[str]:
    """Class names (index -> name) from a data set directory, a manifest, a classes.txt or class folders."""
    from vimoe_dist.data.folderscan import TreeWalker

    p = Path(path)
    if p.is_dir():
        if manifest_path(p, "train").is_file():
            classes = read_manifest(manifest_path(p, "train")).classes
        else:
            classes = TreeWalker(p).class_dirs()
    elif p.suffix == ".json":
        classes = read_manifest(p).classes
    elif p.is_file():
        classes = [line.rstrip("\r") for line in _read_text(p).split("\n")]
        classes = classes[:-1] if classes and classes[-1] == "" else classes
        for i, name in enumerate(classes):
            check_class_name(name, f"--classes-from {p} line {i + 1}")
    else:
        raise UserError(f"--classes-from {p}: does not exist")
    if not classes:
        raise UserError(f"--classes-from {p}: names no classes")
    if len(set(classes)) != len(classes):
        raise UserError(f"--classes-from {p}: names a class twice")
    return list(classes)


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_LABEL_FILE_BYTES:
            raise UserError(f"{path}: larger than {MAX_LABEL_FILE_BYTES >> 20} MiB; is it a label file?")
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})".splitlines()[0]) from None


def read_label_file(path: str | os.PathLike, files: list[str], classes: list[str]) -> dict[str, int]:
    """Maps each of `files` (paths in one flat folder) to its class index by the label file `path`.

    Every line must name a file of the folder and a known class, and every file must have a line: one line naming
    the label file and its line number otherwise.
    """
    path = Path(path)
    text = _read_text(path)
    rows = _rows(text, path)
    index = {name: i for i, name in enumerate(classes)}
    by_name: dict[str, str] = {}
    for file in files:
        name = os.path.basename(file)
        by_name[name] = file
        by_name.setdefault(os.path.splitext(name)[0], file)  # Kaggle names files by their stem

    def find(name: str) -> str | None:
        return by_name.get(name) or by_name.get(os.path.basename(name))

    if rows and find(rows[0][1]) is None and rows[0][2] not in index and not rows[0][2].isdigit():
        rows = rows[1:]  # a header such as `file,label` or `ImageId,PredictionString`
    # class indices (Caffe's val.txt) only when every label is a number and none is a class name
    by_index = bool(rows) and all(t.isdigit() and t not in index for _, _, t in rows)
    labels: dict[str, int] = {}
    for line, name, token in rows:
        where = f"{path} line {line}"
        file = find(name)
        if file is None:
            raise UserError(f"{where}: {name!r} is not an image of {Path(files[0]).parent if files else 'the folder'}")
        if by_index:
            if int(token) >= len(classes):
                raise UserError(f"{where}: label {token!r} is not a class index below {len(classes)}")
            label = int(token)
        elif token in index:
            label = index[token]
        else:
            raise UserError(f"{where}: label {token!r} is not one of the {len(classes)} classes")
        if labels.setdefault(file, label) != label:
            raise UserError(f"{where}: {name!r} has a second, different label")
    unlabelled = [f for f in files if f not in labels]
    if unlabelled:
        raise UserError(f"{path}: {len(unlabelled)} images have no line (first: {unlabelled[0]})")
    return labels


def _rows(text: str, path: Path) -> list[tuple[int, str, str]]:
    """(line number, file, label token) of every non-empty line."""
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if "," in first:
        reader = csv.reader(io.StringIO(text))
        rows = [(reader.line_num, r) for r in reader]
    else:
        rows = [(i + 1, line.split(None, 1)) for i, line in enumerate(lines)]
    out = []
    for line, fields in rows:
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        if len(fields) < 2 or not fields[0] or not fields[1].split():
            raise UserError(f"{path} line {line}: {','.join(fields)[:80]!r} is not 'file,label'")
        out.append((line, fields[0], fields[1].split()[0]))
    return out
