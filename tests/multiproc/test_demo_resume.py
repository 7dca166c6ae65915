"""The shipped demo config resumes exactly: `configs/digits.yaml` as shipped (only the data directory and the number
of steps set) on 2 ranks, 12 steps straight against the same command stopped at step 6 and rerun, ends with the
same weights bit for bit. With the data order a new user gets by default, not one a test chose."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

REPO = Path(__file__).parents[2]


def train(digits: Path, out: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "vimoe_dist", "train", "--config", "configs/digits.yaml", f"data.train={digits}",
           f"data.val={digits}", f"run.out_dir={out}", "train.steps=12", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    root = run / "checkpoints"
    return single_device_state_dict(root, latest_tag(root))


def test_stop_and_rerun_gives_the_weights_of_the_straight_run(tmp_path):
    from vimoe_dist.data import write_digits

    digits = tmp_path / "digits"
    write_digits(digits)
    train(digits, tmp_path / "straight")
    train(digits, tmp_path / "resumed", "train.stop_at=6")
    at6 = weights(tmp_path / "resumed")
    train(digits, tmp_path / "resumed")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert latest_tag(tmp_path / "resumed" / "checkpoints") == "step_00000012"
    assert a.keys() == b.keys()
    assert any(not torch.equal(at6[k], b[k]) for k in b)  # the last 6 steps moved the weights
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
