"""`vimoe train` end to end on CPU ranks (torchrun, gloo): exact resume, resharding to another ep_size, ZeRO stages,
bf16 (training, evaluation, exact resume: the CUDA path runs the same code), export, and the one-line errors for bad
layouts and inputs."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import TINY_RUN

from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from vimoe_dist.data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def train(digits: Path, out: Path, nproc: int, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    data = [f"data.train={digits}/train-{{000000..000011}}.tar", f"data.val={digits}/val-{{000000..000002}}.tar"]
    args = [
        "-m",
        "vimoe_dist",
        "train",
        "--config",
        "configs/digits.yaml",
        *data,
        *TINY_RUN,
        f"run.out_dir={out}",
        *overrides,
    ]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    root = run / "checkpoints"
    return single_device_state_dict(root, latest_tag(root))


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and rec.get("loss") is not None:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory) -> dict[str, Path]:
    """20 steps straight and 10 steps of the same run, ZeRO 0, 2 ranks. Exact resume is tested on the shipped demo
    config (test_demo_resume.py) and in bf16 below; every ZeRO stage reshards bit for bit in test_reshard.py."""
    tmp = tmp_path_factory.mktemp("zero0")
    train(digits, tmp / "straight", 2, "train.steps=20", "parallel.ep_size=2")
    train(digits, tmp / "at10", 2, "train.steps=20", "parallel.ep_size=2", "train.stop_at=10")
    assert latest_tag(tmp / "at10" / "checkpoints") == "step_00000010"
    return {"straight": tmp / "straight", "at10": tmp / "at10", "zero": 0}


@pytest.fixture(scope="module")
def bf16_runs(digits, tmp_path_factory) -> dict[str, Path]:
    """bf16 with ZeRO 1 (the shipped ImageNet configs' setting) on 2 ranks: 6 steps straight, and 3 then 3 more."""
    tmp = tmp_path_factory.mktemp("bf16")
    bf16 = ["train.steps=6", "parallel.ep_size=2", "parallel.zero_stage=1", "parallel.precision=bf16"]
    train(digits, tmp / "straight", 2, *bf16)
    train(digits, tmp / "resumed", 2, *bf16, "train.stop_at=3")
    train(digits, tmp / "resumed", 2, *bf16)
    return {"straight": tmp / "straight", "resumed": tmp / "resumed"}


def test_bf16_trains_evaluates_and_resumes_exactly(bf16_runs, digits):
    straight, resumed = bf16_runs["straight"], bf16_runs["resumed"]
    # DeepSpeed's bf16 optimizer ran (its fp32 master weights are saved in files of their own)
    assert sorted((straight / "checkpoints").glob("step_00000006/bf16_zero_pp_rank_*_optim_states.pt"))
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert losses(resumed)[6] == losses(straight)[6] and all(map(math.isfinite, losses(straight).values()))
    in_training = json.loads((straight / "eval.json").read_text())  # evaluated by the trainer, in bf16
    assert in_training["images"] == 360 and 0 <= in_training["top1"] <= 1
    proc = subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "eval", "--config", str(straight / "config.yaml"), "--checkpoint",
         str(straight), f"data.val={digits}/val-{{000000..000002}}.tar"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = json.loads(proc.stdout.splitlines()[-1])  # `vimoe eval`: the bf16-trained weights, in fp32
    assert alone["images"] == 360 and alone["top1"] == pytest.approx(in_training["top1"], abs=0.03)
    assert alone["device"] == "cpu" and len(alone["worst_classes"]) == 5


@pytest.mark.parametrize(("nproc", "ep"), [(1, 1)])  # through `vimoe train`; the full matrix: test_reshard.py
def test_resharding_to_another_ep_size_keeps_the_model(runs, digits, tmp_path, nproc, ep):
    if runs["zero"] != 0:
        pytest.skip("resharding is checked once, from the ZeRO-0 checkpoint")
    moved = tmp_path / "moved"
    shutil.copytree(runs["at10"], moved)
    proc = train(digits, moved, nproc, "train.steps=20", f"parallel.ep_size={ep}", "train.stop_at=11")
    assert "converting the optimizer state" in proc.stderr
    # step 11's loss is computed with the resharded weights before any update: it must match the straight run
    assert losses(moved)[11] == pytest.approx(losses(runs["straight"])[11], rel=1e-4)


def test_export_loads_without_deepspeed(runs, tmp_path):
    run = runs["straight"]
    out = tmp_path / "model.safetensors"
    subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "export", "--config", str(run / "config.yaml"), "--checkpoint", str(run),
         "--out", str(out)], check=True, capture_output=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    from safetensors.torch import load_file

    from vimoe_dist.config import load_config
    from vimoe_dist.model import build_model

    cfg = load_config(run / "config.yaml", [f"model.pretrained={out}"])
    model = build_model(cfg.model)
    state, saved = load_file(str(out)), final_weights(run)
    assert state["blocks.1.mlp.experts.fc1_weight"].shape[0] == 4  # every expert, from both ranks
    assert state.keys() == saved.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [  # through a real rank process; the config, layout and data refusals are unit-tested (test_bad_inputs.py)
        (["train.global_batch_size=6"], "model.moe.group_size"),  # 6 images per rank, groups of 4
        (["run.out_dir=/proc/vimoe-cannot-write"], "run.out_dir"),
    ],
)
def test_bad_input_is_one_line_before_training(digits, tmp_path, overrides, needle):
    # one process: under torchrun the agent adds its own report of the failed worker
    proc = train(digits, tmp_path / "bad", 1, "train.steps=2", "parallel.ep_size=1", *overrides, expect=2)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_layout_error_comes_before_the_rendezvous(digits, tmp_path):
    """WORLD_SIZE=3 with ep_size 2 cannot work: rank 0 says so at once, instead of waiting at the rendezvous for ranks
    that never come (parallel.timeout_s, 600 s here) and then printing a traceback."""
    from vimoe_dist.net import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1"))}  # fmt: skip
    data = [f"data.train={digits}/train-{{000000..000011}}.tar", f"data.val={digits}/val-{{000000..000002}}.tar"]
    cmd = [sys.executable, "-m", "vimoe_dist", "train", "--config", "configs/digits.yaml", *data, *TINY_RUN,
           f"run.out_dir={tmp_path / 'run'}", "parallel.ep_size=2", "parallel.timeout_s=600"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=Path(__file__).parents[2])
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert errors == ["vimoe train: error: parallel.ep_size: 2 does not divide the world size 3"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
