"""A full disk and a read-only checkpoint directory, made real with a small tmpfs and a read-only bind mount (the
tests need root, as CI has; root ignores file permissions, so a chmod would prove nothing).

- Disk (nearly) full at a checkpoint: every rank stops with one error naming the directory and "no space left on
  device" before DeepSpeed writes anything, the last good checkpoint stays the latest and intact, and once space is
  back the same command resumes from it and ends with the weights of a run that never failed.
- A read-only `checkpoints/`: one line naming it, before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from conftest import assert_no_rank_traceback, assert_same_weights, final_weights

from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def mounted(target, *args: str):
    if os.geteuid() != 0:
        pytest.skip("needs root for mount (CI runs as root)")
    target.mkdir(parents=True, exist_ok=True)
    _mount(*args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _fill(directory, leave: int) -> None:
    """Writes a file until the disk is full, then gives back `leave` bytes."""
    # unbuffered: a buffered file would raise ENOSPC again when it closes, flushing what the failed write left
    with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    size = (directory / "filler").stat().st_size
    os.truncate(directory / "filler", max(size - leave, 0))


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(jobs, reference, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    with mounted(root, "-t", "tmpfs", "-o", "size=16m", "tmpfs"):
        jobs.run(out, "train.stop_at=4")
        assert latest_tag(root) == "step_00000004"
        # room for the run's start-up write probe, not for a checkpoint (a full disk fails already at start-up)
        _fill(root, leave=256 * 1024)

        job = jobs.run(out, expect=1)  # torchrun's code for failed workers; the ranks exit 2
        errors = [line for line in job.log.splitlines() if "vimoe train: error:" in line]
        assert len(errors) == 2, job.log[-3000:]  # one line per rank
        for line in errors:
            assert f"cannot write checkpoint {str(root / 'step_00000008')!r}" in line, line
            assert "no space left on device" in line.lower() and "kept step_00000004" in line, line
        assert_no_rank_traceback(job.log)
        assert latest_tag(root) == "step_00000004" and (root / "latest").read_text() == "step_00000004"
        assert_same_weights(
            single_device_state_dict(reference / "checkpoints", "step_00000004"),
            single_device_state_dict(root, "step_00000004"),
        )

        (root / "filler").unlink()
        job = jobs.run(out)
        assert f"resumed from {root / 'step_00000004'} at step 4" in job.log
        assert_same_weights(final_weights(reference), final_weights(out))


def test_read_only_checkpoint_dir_is_one_line_before_any_work(jobs, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    with mounted(root, "--bind", str(root)):
        _mount("-o", "remount,bind,ro", str(root))
        job = jobs.run(out, "parallel.ep_size=1", nproc=1, expect=2)
    errors = [line for line in job.log.splitlines() if "error:" in line]
    assert errors == [f"vimoe train: error: run.out_dir: cannot write to {str(root)!r} (Read-only file system)"], (
        job.log[-3000:]
    )
    assert "Traceback" not in job.log
    assert not (out / "deepspeed_config.json").exists() and not (out / "metrics.jsonl").exists()
