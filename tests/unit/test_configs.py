"""Every shipped config loads, validates, and builds its model (random weights: the DINOv2 files are not here)."""

from pathlib import Path

import pytest
import torch

from vimoe_dist.config import load_config
from vimoe_dist.model import build_model, moe_layers

CONFIGS = sorted(str(p) for p in Path(__file__).parents[2].glob("configs/**/*.yaml"))


def test_there_are_configs():
    assert any(c.endswith("digits.yaml") for c in CONFIGS) and len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).stem)
def test_config_builds(path):
    cfg = load_config(path, ["model.pretrained=null"])
    with torch.device("meta"):  # the full ViT-B shape, without spending time on initialising its weights
        model = build_model(cfg.model)
    layers = moe_layers(model)
    assert len(layers) >= 1
    assert all(m.num_experts == cfg.model.moe.num_experts for m in layers.values())
