"""`make demo`'s job end to end: the digits shards, 2 CPU ranks through the deepspeed launcher with ep_size 2, and
the held-out top-1 the demo promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

ROOT = Path(__file__).parents[2]


def test_demo_reaches_095_top1(tmp_path):
    out = tmp_path / "digits"
    proc = subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "demo", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["images"] == 360  # the whole held-out split, each digit once
    assert result["top1"] >= 0.95, result
    assert "top-1" in proc.stdout and str(out.resolve()) in proc.stdout
    cfg = (out / "config.yaml").read_text()
    assert "ep_size: 2" in cfg
    # expert-parallel for real: each rank held half of the experts, saved one file per expert
    experts = sorted(p.name for p in (out / "checkpoints").glob("step_*/layer_0_expert_*_model_states.pt"))
    assert len({name.split("_")[3] for name in experts}) == 4
