"""A checkpoint that does not fit is one line naming the file and the mismatch (or both layouts), before DeepSpeed
reads anything: another model (experts, depth, width, router, classes), a missing expert file, a missing optimizer
shard. Nothing is written: the checkpoints and the metrics stay as they were, the previous checkpoint the latest.

One `vimoe train` saves, one shows the whole command failing (one process: under torchrun the agent adds its own
report of the failed worker); the cases run through the trainer's `checkpoint.resume` in one process
(resume_errors_worker.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import TINY_RUN

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

REPO = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("resume_errors_worker.py")
TAG = "step_00000002"
BASE = [*TINY_RUN, "parallel.ep_size=1", "parallel.zero_stage=1", "train.steps=4", "data.val=null"]
# name: (overrides, file removed from the tag, what the one line says)
CASES = {
    "num_experts": (["model.moe.num_experts=8"], None, [
        "does not fit this run (model.moe.num_experts): saved at 1 rank, ep_size 1, ZeRO 1, fp32: 2 MoE layers of 4 "
        "experts (4 per rank)", "this run: 1 rank, ep_size 1, ZeRO 1, fp32: 2 MoE layers of 8 experts (8 per rank)"]),
    "router": (["model.moe.router=ec-softmax"], None,
               ["(model.moe.router)", "router tc-softmax;", "router ec-softmax"]),
    "depth": (["model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}"], None,
              ["mp_rank_00_model_states.pt' does not fit this model: 2 blocks there, 3 here"]),
    "width": (["model.backbone_kwargs={patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"], None,
              ["does not fit this model: cls_token is [1, 1, 32] there, [1, 1, 48] here (the width"]),
    "num_classes": (["model.num_classes=12"], None,
                    ["does not fit this model: head.weight is [10, 32] there, [12, 32] here (model.num_classes?)"]),
    "expert_file": ([], "layer_1_expert_2_mp_rank_00_model_states.pt",
                    [f"{TAG}': layer_1_expert_2_mp_rank_00_model_states.pt is missing (a tag saved at 1 rank"]),
    "optimizer_shard": ([], "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        [f"{TAG}': zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"]),
}  # fmt: skip


def data(digits: Path) -> list[str]:
    return [f"data.train={digits}/train-{{000000..000011}}.tar"]


def train(digits: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vimoe_dist", "train", "--config", "configs/digits.yaml", *data(digits), *BASE,
           f"run.out_dir={out}", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the checkpoints and the metrics, with its bytes."""
    files = [*sorted((run / "checkpoints").rglob("*")), run / "metrics.jsonl"]
    return {str(f.relative_to(run)): f.read_bytes() for f in files if f.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    from vimoe_dist.data import write_digits

    digits = tmp_path_factory.mktemp("digits")
    write_digits(digits)
    run = tmp_path_factory.mktemp("saved") / "run"
    proc = train(digits, run, "train.stop_at=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == TAG
    return digits, run


@pytest.fixture(scope="module")
def errors(saved, tmp_path_factory) -> dict[str, tuple[str | None, bool]]:
    """Each case's error, and whether its copy of the checkpoints stayed as it was."""
    digits, original = saved
    tmp = tmp_path_factory.mktemp("cases")
    cases, before = {}, {}
    for name, (overrides, remove, _) in CASES.items():
        run = tmp / name
        shutil.copytree(original, run)
        if remove:
            (run / "checkpoints" / TAG / remove).unlink()
        before[name] = snapshot(run)
        cases[name] = {"overrides": overrides, "checkpoint": str(run / "checkpoints")}
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp / "errors.json"), "tag": TAG, "base": [*data(digits), *BASE],
                                "cases": cases}))  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "1", "--standalone", str(WORKER), str(spec)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = json.loads((tmp / "errors.json").read_text())
    return {name: (messages[name], snapshot(tmp / name) == before[name]) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_a_checkpoint_that_does_not_fit_is_one_line_and_writes_nothing(errors, name):
    message, unchanged = errors[name]
    assert message is not None, "resumed"
    assert "\n" not in message and all(n in message for n in CASES[name][2]), message
    assert unchanged


def test_the_command_prints_that_line_and_exits_2(saved, tmp_path):
    digits, original = saved
    run = tmp_path / "run"
    shutil.copytree(original, run)
    before = snapshot(run)
    proc = train(digits, run, "model.moe.num_experts=8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("vimoe train: error: checkpoint "), proc.stderr[-3000:]
    assert CASES["num_experts"][2][1] in lines[0]
    assert "Traceback" not in proc.stderr
    assert snapshot(run) == before
