"""from-folder on trees that hold more than images: FIFOs, devices and broken symlinks are skipped with a warning
(never opened), symlink loops are not followed, a class name with a line break is refused in one line. The hangs run
in a child process with a time limit, so that a regression fails the test instead of hanging it."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vimoe_dist.data import read_manifest
from vimoe_dist.data.folder import write_from_folder
from vimoe_dist.errors import UserError


def tree(root, classes=("ant", "bee"), per_class=3):
    for c, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 20 * c + i, dtype=np.uint8)).save(buf, format="PNG")
            (root / "train" / name / f"{i}.png").write_bytes(buf.getvalue())


def from_folder(src, out, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "data", "from-folder", str(src), "--out", str(out), "--workers", "1"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "make", "reason"),
    [
        ("fifo", lambda path, tmp: os.mkfifo(path), "a FIFO"),  # opening it for reading blocks forever
        ("device", lambda path, tmp: os.symlink("/dev/zero", path), "a character device"),  # reading never ends
        ("broken", lambda path, tmp: os.symlink(tmp / "gone.png", path), "a broken symlink"),
    ],
)
def test_fifos_devices_and_broken_symlinks_are_skipped_with_a_warning(tmp_path, kind, make, reason):
    tree(tmp_path / "src")
    path = tmp_path / "src" / "train" / "ant" / f"{kind}.png"
    make(path, tmp_path)
    proc = from_folder(tmp_path / "src", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {path}: {reason}" in proc.stderr
    assert read_manifest(tmp_path / "out" / "train.json").label_counts == [3, 3]


def test_symlink_loops_are_not_followed(tmp_path, caplog):
    tree(tmp_path / "src")
    train = tmp_path / "src" / "train"
    os.symlink(train, train / "evil")  # a class folder that is the split itself: a copy of every image
    os.symlink("..", train / "bee" / "up")  # a loop inside a class
    os.symlink(tmp_path / "src", train / "ant" / "root")  # a link to the split's parent
    write_from_folder(tmp_path / "src", tmp_path / "out", progress=False)
    manifest = read_manifest(tmp_path / "out" / "train.json")
    assert manifest.classes == ["ant", "bee"] and manifest.label_counts == [3, 3]
    assert "symlink loop" in caplog.text


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "x\u2028y", "nul\x01"])
def test_a_class_name_with_a_line_break_or_control_character_is_refused(tmp_path, name):
    tree(tmp_path / "src", classes=("ant", name, "cat"))
    with pytest.raises(UserError) as info:
        write_from_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and f"class name {name!r} holds a line break or control character" in str(
        info.value
    )
    assert not (tmp_path / "out" / "classes.txt").exists()
