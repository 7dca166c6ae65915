"""Optimizer state that reshards: a run saved at (4 ranks, ep_size 4) resumes at (2, 2) and at (1, 1), and (1, 1)
saves again and resumes at (4, 4), for ZeRO 0, 1 and 2 in fp32 and for ZeRO 2 in bf16. After each resume the
optimizer state that DeepSpeed's own API gathers (Adam's moments and steps, the fp32 masters) equals, bit for bit,
the state gathered when the checkpoint was saved, and the next steps' losses are those of the run that never changed
layout (to 1e-4 relative in fp32; bf16 reduces in another order on another number of ranks). The (2, 2) resume reads
the layout-free form `vimoe checkpoint reshard` wrote, the others convert DeepSpeed's files at load.

Four torchrun jobs in all (reshard_worker.py runs every case in one process per rank), a 2-block ViT of width 16."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

WORKER = Path(__file__).with_name("reshard_worker.py")
CASES = {"zero0": (0, "fp32"), "zero1": (1, "fp32"), "zero2": (2, "fp32"), "zero2-bf16": (2, "bf16")}
STEPS = 6


def launch(tmp: Path, nproc: int, ep: int, cases: list[dict]) -> dict:
    out = tmp / f"n{nproc}_ep{ep}_{cases[0].get('resume_step', 0)}.json"
    spec = tmp / f"{out.stem}.spec.json"
    spec.write_text(json.dumps({"out": str(out), "ep": ep, "cases": cases}))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", str(nproc), "--standalone", str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [out, *sorted(tmp.glob(f"{out.name}.rank*"))]
    return {"rank0": json.loads(out.read_text()), "ranks": [json.loads(p.read_text()) for p in ranks]}


def case(name: str, **kw) -> dict:
    zero, precision = CASES[name]
    return {"name": name, "zero": zero, "precision": precision, "steps": STEPS, **kw}


def vimoe(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "vimoe_dist", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(4, 4) saves at step 3; (2, 2) resumes it from the layout-free form written offline by `vimoe checkpoint
    reshard`; (1, 1) resumes it from DeepSpeed's files (converted at load) and saves at step 5; (4, 4) resumes that."""
    tmp = tmp_path_factory.mktemp("reshard")
    a, b, r = (lambda n: str(tmp / f"a_{n}")), (lambda n: str(tmp / f"b_{n}")), (lambda n: str(tmp / f"r_{n}"))
    out = {"dir": tmp, "straight": launch(tmp, 4, 4, [case(n, save_root=a(n), save_at=3) for n in CASES])}
    for n in CASES:
        shutil.copytree(a(n), r(n))
        out[f"reshard_{n}"] = vimoe("checkpoint", "reshard", r(n), "--ep-size", "2", "--world-size", "2").stdout
    out["down2"] = launch(tmp, 2, 2, [case(n, resume=r(n), resume_step=3) for n in CASES])
    out["down1"] = launch(tmp, 1, 1, [case(n, resume=a(n), resume_step=3, save_root=b(n), save_at=5) for n in CASES])
    out["up4"] = launch(tmp, 4, 4, [case(n, resume=b(n), resume_step=5) for n in CASES])
    return out


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("run", ["down2", "down1", "up4"])
def test_the_optimizer_state_carries_over_bit_for_bit(runs, run, name):
    for rank in runs[run]["ranks"]:
        got = rank[name]
        assert got["compared"] > 0
        assert not got["differ"], f"{len(got['differ'])} of {got['compared']} differ, first {got['differ'][0]}"


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("run", ["down2", "down1", "up4"])
def test_the_next_steps_are_those_of_the_run_that_never_moved(runs, run, name):
    ref = runs["straight"]["rank0"][name]["losses"]
    got = runs[run]["rank0"][name]["losses"]
    assert set(got) == {str(s) for s in range(6 if run == "up4" else 4, STEPS + 1)}
    assert abs(ref["6"] - ref["1"]) > 1e-3  # the losses move, or the comparison would prove nothing
    tolerance = 1e-4 if CASES[name][1] == "fp32" else 2e-2
    for step, loss in got.items():
        assert abs(loss - ref[step]) / abs(ref[step]) < tolerance, f"step {step}: {loss} against {ref[step]}"


def test_info_names_the_files_each_rank_reads(runs):
    root = runs["dir"] / "a_zero1"
    info = json.loads(vimoe("checkpoint", "info", str(root), "--ep-size", "2", "--world-size", "2", "--json").stdout)
    assert [t["tag"] for t in info["tags"]] == ["step_00000003"] and info["latest"] == "step_00000003"
    assert info["tags"][0]["layout"].startswith("4 ranks, ep_size 4, ZeRO 1, fp32: 2 MoE layers of 4 experts")
    plan = info["resume"]
    assert not plan["native"] and len(plan["ranks"]) == 2
    # rank 1 of (2, 2) holds experts 2 and 3, and reads every rank's optimizer partition of the (4, 4) save
    assert "layer_1_expert_3_mp_rank_00_model_states.pt" in plan["ranks"][1]
    assert "layer_1_expert_0_mp_rank_00_model_states.pt" not in plan["ranks"][1]
    assert all(f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt" in plan["ranks"][1] for d in range(4))
    table = vimoe("checkpoint", "info", str(root)).stdout
    assert ("rank 3: mp_rank_00_model_states.pt, layer_{0..1}_expert_3_mp_rank_00_model_states.pt, "
            "zero_pp_rank_3_mp_rank_00_optim_states.pt, vimoe_rank_00003.pt") in table  # fmt: skip
    assert "each rank reads its share" in runs["reshard_zero1"]


def test_reshard_of_a_tag_missing_an_optimizer_shard_is_one_line_and_writes_nothing(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["dir"] / "a_zero2", broken)
    (broken / "step_00000003" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    proc = vimoe("checkpoint", "reshard", str(broken), "--ep-size", "2", expect=2)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "zero_pp_rank_2_mp_rank_00_optim_states.pt is missing" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (broken / "step_00000003" / "vimoe_optim").exists()
    assert not [p for p in (broken / "step_00000003").iterdir() if p.name.startswith(".")]
