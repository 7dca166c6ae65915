"""The ViMoE study chain end to end on the digits data: `vimoe study layers` trains a (tiny, short) run with the real
trainer and DeepSpeed checkpoints, `vimoe analyze routing` reads that checkpoint, `vimoe prune` turns one MoE layer
dense, and the trainer fine-tunes from what prune wrote. Checks the outputs of each step, not the accuracy (a few
steps on CPU learn little)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vimoe_dist.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# the demo config at smoke size: 2 MoE blocks (4 and 5 of 6), 4 experts, top-2 image routing, shared expert
SMALL = [
    "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 6, num_heads: 2}",
    "parallel.ep_size=1",
    "train.global_batch_size=16",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=3",
    "train.checkpoint_every=0",
    "train.progress=false",
    "data.num_workers=0",
]


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[str]:
    data = tmp_path_factory.mktemp("digits")
    _run([sys.executable, "-m", "vimoe_dist", "data", "digits", "--out", str(data)])
    train = sorted(p.name for p in data.glob("train-*.tar"))
    val = sorted(p.name for p in data.glob("val-*.tar"))
    return [
        f"data.train=[{', '.join(str(data / n) for n in train)}]",
        f"data.val=[{', '.join(str(data / n) for n in val)}]",
    ]


def test_study_analyze_prune_finetune(digits, tmp_path, capsys) -> None:
    overrides = [*SMALL, *digits]
    study = tmp_path / "study"
    config = str(REPO / "configs" / "digits.yaml")
    _run(
        [
            sys.executable,
            "-m",
            "vimoe_dist",
            "study",
            "layers",
            "--config",
            config,
            "--L",
            "2",
            "--out",
            str(study),
            *overrides,
        ]
    )
    run = study / "L2-shared"
    run_eval = json.loads((run / "eval.json").read_text())
    results = json.loads((study / "study.json").read_text())
    assert [(r["L"], r["variant"]) for r in results] == [(2, "shared expert")]
    assert results[0]["top1"] == run_eval["top1"]
    assert (study / "top1_vs_L.png").read_bytes()[:4] == b"\x89PNG"

    # analyze the DeepSpeed checkpoint of the run (config found in the run directory)
    routing = tmp_path / "routing"
    out = _cli(["analyze", "routing", "--checkpoint", str(run), "--out", str(routing)], capsys)
    assert "specialised (keep)" in out
    report = json.loads((routing / "routing.json").read_text())
    assert sorted(report["layers"]) == ["4", "5"]
    assert report["images"] == run_eval["images"] == 360
    # same model, same data, same eval capacity: the trainer's final top-1
    assert report["top1"] == pytest.approx(run_eval["top1"])
    assert set(report["recommendation"]["keep"]) | set(report["recommendation"]["redundant"]) == {4, 5}
    for scores in report["layers"].values():
        assert 0 <= scores["specialisation"] <= 1 and 0 <= scores["nmi"] <= 1
        assert scores["images"] == 360
    matrices = torch.load(routing / "matrices.pt", weights_only=False)
    for layer in matrices["layers"].values():
        torch.testing.assert_close(layer["image_weight_CE"].sum(1) + layer["images_dropped_C"], layer["images_C"])
        assert layer["images_C"].sum() == 360
    assert matrices["class_names"] is not None and len(matrices["class_names"]) == 10
    assert sorted(p.name for p in (routing / "heatmaps").iterdir()) == ["block_04.png", "block_05.png"]
    assert (routing / "overview.png").read_bytes()[:4] == b"\x89PNG"

    # prune block 4 (default mode: the shared expert alone), keep block 5
    pruned = tmp_path / "pruned"
    out = _cli(["prune", "--checkpoint", str(run), "--keep-layers", "5", "--out", str(pruned)], capsys)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["keep"] == [5] and summary["pruned"] == [4] and summary["mode"] == "shared"
    assert summary["top1_before"] == pytest.approx(run_eval["top1"])
    assert 0 <= summary["top1_after"] <= 1 and summary["images"] == 360
    new_cfg = yaml.safe_load((pruned / "config.yaml").read_text())
    assert new_cfg["model"]["moe"]["layers"] == [5]
    assert new_cfg["model"]["pretrained"] == str(pruned / "model.safetensors")

    # the pruned model through the trainer's own path: evaluate it, then fine-tune two steps from it
    finetune = tmp_path / "finetune"
    result = _run(
        [
            sys.executable,
            "-m",
            "vimoe_dist",
            "train",
            "--config",
            str(pruned / "config.yaml"),
            "train.steps=2",
            f"run.out_dir={finetune}",
        ]
    )
    assert (finetune / "eval.json").is_file(), result.stdout[-2000:]
    resolved = yaml.safe_load((finetune / "config.yaml").read_text())
    assert resolved["model"]["moe"]["layers"] == [5]
