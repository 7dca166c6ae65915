"""Tracking in real training runs on CPU ranks (`vimoe train` on the digits shards): TensorBoard's event files, read
back with its own reader, hold the routing heatmaps of every MoE layer after each evaluation; the log records carry
the all-to-all time, tokens/s, model FLOPs, MFU against a configured peak and a gradient norm taken before clipping
(fp32 ZeRO-0, where DeepSpeed keeps none); DeepSpeed's own csv monitor, passed through `parallel.deepspeed`, writes
into the run directory; `vimoe eval` shows its progress; and 2 expert-parallel ranks time their all-to-all and count
the same FLOPs per image as one process."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import TINY_RUN

pytestmark = [pytest.mark.slow]
pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'vimoe-dist[tensorboard]'")

ROOT = Path(__file__).parents[2]
PEAK_TFLOPS, CLIP = 0.5, 1e-3
TRACKED = [
    "train.steps=4", "train.eval_every=2", "train.grad_accum=2", f"train.grad_clip={CLIP}", "parallel.ep_size=1",
    "metrics.tensorboard=true", f"metrics.peak_tflops={PEAK_TFLOPS}",
    "parallel.deepspeed={csv_monitor: {enabled: true}}",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from vimoe_dist.data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def train(digits: Path, out: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    args = ["-m", "vimoe_dist", "train", "--config", "configs/digits.yaml", f"data.train={digits}",
            f"data.val={digits}", *TINY_RUN, f"run.out_dir={out}", *overrides]  # fmt: skip
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "run"
    train(digits, out, 1, *TRACKED)
    return out


def test_tensorboard_holds_the_routing_heatmaps_of_each_evaluation(run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["routing/block_0", "routing/block_1"]  # the 2 MoE blocks
    for tag in acc.Tags()["images"]:
        events = acc.Images(tag)
        assert [e.step for e in events] == [2, 4]  # the evaluation at step 2 and the final one
        png = Image.open(io.BytesIO(events[-1].encoded_image_string))
        assert png.size == (events[-1].width, events[-1].height) and min(png.size) > 100
    assert sorted(p.relative_to(run).as_posix() for p in (run / "routing").rglob("*.png")) == [
        f"routing/step_0000000{s}/block_0{b}.png" for s in (2, 4) for b in (0, 1)
    ]
    for name in ("mfu", "flops_per_image", "achieved_tflops", "tokens_per_sec", "alltoall_seconds", "grad_norm"):
        assert [e.step for e in acc.Scalars(f"train/{name}")] == [1, 2, 3, 4], name


def test_records_carry_the_efficiency_figures_and_a_norm_before_clipping(run):
    from vimoe_dist.config import load_config
    from vimoe_dist.model import build_model
    from vimoe_dist.model.flops import model_flops, nominal_expert_rows

    model = build_model(load_config(run / "config.yaml").model)
    fixed, nominal = model_flops(model).fixed, model_flops(model, nominal_expert_rows(model)).forward
    logged = records(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 100 * CLIP, r  # measured before DeepSpeed clips
        assert r["alltoall_seconds"] == 0.0  # one rank: no expert-parallel dispatch
        assert r["tokens_per_sec"] == pytest.approx(r["images_per_sec"] * 17)  # 16 patches and the class token
        assert 3 * fixed < r["flops_per_image"] <= 3 * nominal  # routed experts at their real rows (some dropped)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / PEAK_TFLOPS)
        assert not any(k.startswith("gpu_") for k in r)  # no GPU memory on the CPU
    assert len({r["flops_per_image"] for r in logged}) > 1  # the rows change with the routing


def test_deepspeed_monitors_pass_through_into_the_run_directory(run):
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["csv_monitor"] == {"enabled": True, "output_path": str(run / "deepspeed_monitor")}
    written = list((run / "deepspeed_monitor").rglob("*.csv"))
    assert written and all(p.stat().st_size > 0 for p in written)


def test_vimoe_eval_shows_progress_in_a_log(run):
    cmd = [sys.executable, "-m", "vimoe_dist", "eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("eval: ")]
    batches = lines[0].removeprefix("eval: starting, ").split()[0]
    assert lines[0] == f"eval: starting, {batches} batches" and int(batches) > 1
    assert lines[-1].startswith(f"eval: {batches}/{batches} batches in ")
    assert json.loads(proc.stdout)["images"] == 360


@pytest.mark.multiproc
def test_two_expert_parallel_ranks_time_their_all_to_all_and_count_the_same_flops(run, digits, tmp_path):
    two = tmp_path / "two"
    train(digits, two, 2, *TRACKED, "parallel.ep_size=2", "metrics.tensorboard=false")
    one, both = records(run), records(two)
    assert all(r["alltoall_seconds"] > 0 for r in both)
    for a, b in zip(one, both):
        # the same global batches route the same way on any layout, so the same expert rows per image
        assert b["flops_per_image"] == pytest.approx(a["flops_per_image"], rel=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
