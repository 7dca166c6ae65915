"""`vimoe data ... --out DIR` over an existing data set: the new one is written beside the old and swapped in only when
complete, so an interrupted write (Ctrl-C, SIGTERM) leaves the old data set intact and no debris; progress goes to a
log as plain lines."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from vimoe_dist.data import read_manifest
from vimoe_dist.data.synthetic import write_synthetic
from vimoe_dist.errors import UserError


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def synthetic(out, *args) -> list[str]:
    return [sys.executable, "-m", "vimoe_dist", "data", "synthetic", "--out", str(out), "--classes", "4", *args]


def new_shards(out, since: float) -> list:
    """Shards written since `since`, wherever the writer puts them."""
    found = []
    for path in out.rglob("train-*"):
        try:
            if path.stat().st_mtime >= since:
                found.append(path)
        except FileNotFoundError:  # renamed meanwhile
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_rewrite_leaves_the_old_data_set_intact(tmp_path, sig):
    out = tmp_path / "data"
    write_synthetic(out, num_classes=4, num_images=40, size=16, max_count=10, progress=False)
    before = digest(out)
    started = time.time()
    # a write long enough to interrupt: 40,000 images of 64 px by 2 writer processes
    proc = subprocess.Popen(synthetic(out, "--images", "40000", "--max-count", "500", "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(new_shards(out, started)) < 2:
            time.sleep(0.05)
        assert len(new_shards(out, started)) >= 2, "the new data set was never being written"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    assert digest(out) == before  # every old file as it was, nothing added (no staging folder, no .tmp)
    assert read_manifest(out / "train.json").num_samples == 40


def test_a_complete_rewrite_replaces_the_split_and_keeps_the_others(tmp_path):
    out = tmp_path / "data"
    write_synthetic(out, num_classes=4, num_images=40, num_val=8, size=16, max_count=10, progress=False)
    (out / "train-000007.tar.tmp123").write_bytes(b"debris of an older writer")
    write_synthetic(out, num_classes=4, num_images=20, num_val=0, size=16, max_count=10, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train.json", "val-000000.tar", "val.json",
    ]  # fmt: skip
    assert read_manifest(out / "train.json").num_samples == 20 and read_manifest(out / "val.json").num_samples == 8


@pytest.mark.slow
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    proc = subprocess.run(synthetic(tmp_path / "d", "--images", "200", "--size", "16", "--max-count", "10",
                                    "--workers", "1"), capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"\r" not in proc.stderr  # bytes: text mode would turn a carriage return into a newline
    lines = [line for line in proc.stderr.decode().split("\n") if line.startswith("train shards: ")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("train shards: 200/200 img (100%)")


def test_two_writers_are_kept_apart_and_a_killed_writers_folder_is_removed(tmp_path):
    out = tmp_path / "data"
    write_synthetic(out, num_classes=2, num_images=4, size=16, progress=False)
    (out / ".vimoe-partial-999999").mkdir()  # what a writer killed by SIGKILL leaves
    (out / ".vimoe-partial-999999" / "train-000000.tar").write_bytes(b"half")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer at work
        with pytest.raises(UserError, match="another `vimoe data` is writing this data set"):
            write_synthetic(out, num_classes=2, num_images=4, size=16, progress=False)
    finally:
        os.close(fd)
    write_synthetic(out, num_classes=2, num_images=4, size=16, progress=False)
    assert not list(out.glob(".vimoe-partial-*"))
