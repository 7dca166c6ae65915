"""Layout invariance: the same config and global batches on 1 rank (ep 1), 2 ranks (ep 2) and 4 ranks (ep 2: two
expert-parallel groups, their expert-data-parallel reduction included) give the same loss for 10 steps. Any
difference is a bug in dispatch, grouping or gradient reduction."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

WORKER = Path(__file__).with_name("layout_worker.py")
ROUTERS = ["tc-softmax", "ec-softmax", "soft"]
LAYOUTS = [(1, 1), (2, 2), (4, 2)]  # 4 ranks with ep 4: test_reshard.py


def run_layout(tmp_path: Path, nproc: int, ep: int) -> dict:
    out = tmp_path / f"n{nproc}_ep{ep}.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", str(nproc), "--standalone", str(WORKER), str(out), str(ep), *ROUTERS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "rank0": json.loads(out.read_text()),
        "others": [json.loads(p.read_text()) for p in tmp_path.glob(f"{out.name}.rank*")],
    }


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    return {layout: run_layout(tmp, *layout) for layout in LAYOUTS}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_same_loss_whatever_the_layout(layouts, router, layout):
    ref = layouts[(1, 1)]["rank0"][router]["losses"]
    got = layouts[layout]["rank0"][router]["losses"]
    assert len(got) == len(ref) == 10
    # the losses must also move, or the comparison would prove nothing
    assert abs(ref[-1] - ref[0]) > 1e-3
    for step, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) / abs(a) < 1e-4, f"step {step}: {a} (1 rank) vs {b} ({layout[0]} ranks, ep {layout[1]})"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_holds_its_share_of_experts(layouts, layout):
    nproc, ep = layout
    full = layouts[(1, 1)]["rank0"]["tc-softmax"]["expert_params"]
    for result in [layouts[layout]["rank0"], *layouts[layout]["others"]]:
        assert result["tc-softmax"]["local_experts"] == 4 // ep
        assert result["tc-softmax"]["expert_params"] * ep == full
