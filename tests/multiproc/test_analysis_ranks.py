"""`vimoe analyze routing` on 2 CPU ranks (torchrun, gloo) gives what one process gives: each rank runs its share of
the validation data on a full copy of the model and the class x expert statistics are summed across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vimoe_dist.cli import main
from vimoe_dist.config import load_config, save_config

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Synthetic shards and a freshly initialised tiny ViMoE saved as `vimoe prune` writes one (weights + config)."""
    from vimoe_dist.analysis.prune import save_pruned
    from vimoe_dist.model import build_model

    tmp = tmp_path_factory.mktemp("ranks")
    data = tmp / "data"
    cmd = [sys.executable, "-m", "vimoe_dist", "data", "synthetic", "--out", str(data), "--classes", "6"]
    cmd += ["--images", "60", "--val-images", "100", "--size", "16", "--max-count", "30", "--workers", "1"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=300)
    val = sorted(str(p) for p in data.glob("val-*.tar"))
    cfg = load_config(
        REPO / "configs" / "digits.yaml",
        [
            f"data.val=[{', '.join(val)}]",
            "model.num_classes=6",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2}",
            "model.moe.routing=token",  # per-token weights: sums over many different rows
            "parallel.ep_size=1",
            "train.global_batch_size=16",
            "data.num_workers=0",
        ],
    )
    torch.manual_seed(0)
    ckpt = tmp / "model"
    save_pruned(build_model(cfg.model), ckpt)
    save_config(cfg, ckpt / "config.yaml")
    return ckpt


def test_two_ranks_match_one_process(checkpoint, tmp_path, capsys) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "routing", "--checkpoint", str(checkpoint), "--out", str(one)])
    assert exit_info.value.code == 0, capsys.readouterr().out
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--standalone", "-m", "vimoe_dist", "analyze", "routing"]
    cmd += ["--checkpoint", str(checkpoint), "--out", str(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "routing.json").read_text()) for d in (one, two))
    assert a["images"] == b["images"] == 100
    assert b["ranks"] == 2
    assert a["top1"] == b["top1"]
    assert a["recommendation"]["keep"] == b["recommendation"]["keep"]
    for block in a["layers"]:
        for key in ("nmi", "specialisation", "purity", "load_cv", "routing_degree", "dropped_tokens"):
            assert a["layers"][block][key] == pytest.approx(b["layers"][block][key], abs=1e-9), (block, key)
    ma, mb = (torch.load(d / "matrices.pt", weights_only=False)["layers"] for d in (one, two))
    for block in ma:
        for key in ("image_weight_CE", "token_weight_CE", "images_C", "tokens_dropped_C", "load_E", "mass_E"):
            torch.testing.assert_close(ma[block][key], mb[block][key])
        # the same images, whichever rank ran them
        assert sorted(ma[block]["image_labels"].tolist()) == sorted(mb[block]["image_labels"].tolist())
