"""Bad data on one rank stops every rank at once, each with one line, not after the collective timeout.

In stream order rank r reads shards r, r + world, ...: with a good shard 0 and a damaged shard 1, only rank 1
meets the bad samples. Its loader raises past `data.max_bad_fraction`; rank 0 is then about to enter the next
MoE all-to-all, which without a word from rank 1 would wait out `parallel.timeout_s`.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time

from conftest import assert_no_rank_traceback


def _damage(src, dst) -> None:
    """A copy of a digits shard whose every second image is cut in half (PIL fails to decode it)."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as out:
        images = 0
        for member in tar:
            data = tar.extractfile(member).read()
            if member.name.endswith(".png"):
                images += 1
                if images % 2 == 0:
                    data = data[: len(data) // 2]
                    member.size = len(data)
            out.addfile(member, io.BytesIO(data))


def test_bad_data_on_one_rank_stops_every_rank_at_once(jobs, digits_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(digits_dir / "train-000000.tar", shards / "train-000000.tar")
    _damage(digits_dir / "train-000001.tar", shards / "train-000001.tar")
    start = time.monotonic()
    job = jobs.run(
        tmp_path / "run", "data.order=stream", f"data.train={shards}/train-{{000000..000001}}.tar",
        "data.max_bad_fraction=0.2", "train.steps=40", "parallel.timeout_s=300", expect=1,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    errors = [line for line in job.log.splitlines() if "vimoe train: error:" in line]
    assert len(errors) == 2, job.log[-4000:]  # one line per rank
    assert sum("data.max_bad_fraction=0.2" in line and "rank 1" in line for line in errors) == 1, errors
    assert sum("stopping with rank 1, whose training data failed" in line for line in errors) == 1, errors
    assert_no_rank_traceback(job.log)
    assert elapsed < 240, f"{elapsed:.0f} s: a rank waited for the collective timeout"  # timeout_s is 300
