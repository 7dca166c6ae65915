"""Listing the images of a folder tree as data, not as instructions: what `vimoe data from-folder` may read.

A tree on a shared file system holds more than images. Each path is checked before it is opened:
- only regular files are read: a FIFO would block the writer forever and a device (`/dev/zero` behind a symlink)
  would never end, so both are skipped with a warning, as are broken symlinks;
- symlinked directories are followed (class folders linked from another copy of ImageNet are common), but never
  into a directory already read or one that contains the split itself: a link back up the tree (`train/x -> ..`)
  would otherwise make a class holding a copy of every image;
- class names come from folder names and end up one per line in `classes.txt`, so a name with a line break or
  another control character is refused (it would shift every later class by a line).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from pathlib import Path

from vimoe_dist.data.manifest import check_class_name

log = logging.getLogger("vimoe_dist.data")

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_WARNINGS = 10  # skipped paths named one by one; the rest are counted


class SkipLog:
    """Warns about skipped paths (the first few by name) and counts them all by reason."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def skip(self, path: str, reason: str) -> None:
        self.reasons[reason] += 1
        if sum(self.reasons.values()) <= MAX_WARNINGS:
            log.warning("from-folder: skipping %s: %s", path, reason)

    def summary(self) -> None:
        total = sum(self.reasons.values())
        if total > MAX_WARNINGS:
            counts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
            log.warning("from-folder: skipped %d paths in all (%s)", total, counts)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


class TreeWalker:
    """Walks one split folder (`root`), following directory symlinks at most once each and never upwards."""

    def __init__(self, root: Path, skips: SkipLog | None = None) -> None:
        self.root = root
        self.root_real = os.path.realpath(root)
        self.seen_dirs = {self.root_real}
        self.skips = skips or SkipLog()

    def class_dirs(self) -> list[str]:
        """Names of the class folders (sorted: torchvision's ImageFolder order); hidden entries are ignored."""
        names, reals = [], set()
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = os.path.join(self.root, entry.name)
            real = os.path.realpath(path)
            if entry.is_symlink() and not os.path.exists(path):
                self.skips.skip(path, "a broken symlink")
            elif entry.is_dir() and self._loops(path, real):
                continue
            elif entry.is_dir() and real in reals:
                self.skips.skip(path, f"the same directory as another class folder ({real})")
            elif entry.is_dir():
                check_class_name(entry.name, f"{self.root}: folder {entry.name!r}")
                names.append(entry.name)
                reals.add(real)
        return names

    def image_files(self, directory: Path, recursive: bool = True) -> list[str]:
        """Image files under `directory`, sorted, each a regular file; directories as described above."""
        real = os.path.realpath(directory)
        if directory != self.root and not self._enter(str(directory), real):
            return []
        out: list[str] = []
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            self.skips.skip(str(directory), f"cannot be listed ({e.strerror or e})")
            return []
        for entry in entries:
            path = os.path.join(directory, entry.name)
            try:
                st = os.stat(path)  # follows symlinks: what would be opened
            except OSError as e:
                self.skips.skip(path, "a broken symlink" if entry.is_symlink() else f"cannot be read ({e.strerror})")
                continue
            if stat.S_ISDIR(st.st_mode):
                if recursive and not entry.name.startswith("."):
                    out.extend(self.image_files(Path(path)))
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if not stat.S_ISREG(st.st_mode):
                self.skips.skip(path, file_kind(st.st_mode))
                continue
            out.append(path)
        return out

    def _enter(self, path: str, real: str) -> bool:
        if self._loops(path, real):
            return False
        if real in self.seen_dirs:
            self.skips.skip(path, f"the same directory as one already read ({real}): a symlink loop or a duplicate")
            return False
        self.seen_dirs.add(real)
        return True

    def _loops(self, path: str, real: str) -> bool:
        """True (with a warning) for a directory that is the split folder or holds it."""
        if self.root_real == real or self.root_real.startswith(real.rstrip(os.sep) + os.sep):
            self.skips.skip(path, f"a link to {real}, which holds the split itself (a symlink loop)")
            return True
        return False
