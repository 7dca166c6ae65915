"""Blame for a non-finite loss that starts before the MoE layers (vimoe_dist/train/nonfinite.py), on a real tiny ViMoE:
a NaN image is the input's fault and a NaN or overflowing patch embedding the embedding's, not the first router's
(which sees the NaN too, and was blamed before); a bad router is left to the router check (train/monitor.py)."""

from __future__ import annotations

import pytest
import torch
from support import TINY_RUN

from vimoe_dist.config import load_config
from vimoe_dist.model import build_model, moe_layers
from vimoe_dist.train.monitor import RoutingMonitor
from vimoe_dist.train.nonfinite import NonFiniteWatch


@pytest.fixture
def model_and_cfg():
    cfg = load_config("configs/digits.yaml", [o for o in TINY_RUN if not o.startswith("data.")])
    torch.manual_seed(0)
    return build_model(cfg.model).train(), cfg


def _forward(model, x):
    loss = model(x).float().logsumexp(-1).mean()
    return bool(torch.isfinite(loss))


def test_a_nan_image_is_blamed_on_the_input_not_the_first_router(model_and_cfg):
    model, cfg = model_and_cfg
    watch = NonFiniteWatch(model)
    monitor = RoutingMonitor(cfg, moe_layers(model))
    x = torch.randn(8, 3, 16, 16)
    assert _forward(model, x) and watch.source(0, 1) == ""
    x[3, 1, 2, 2] = float("nan")
    assert not _forward(model, x)
    assert watch.source(0, 1) == "the input batch has non-finite values on rank 0 (the data or its normalisation)"
    assert monitor.bad_router(0, 1).startswith("the router of MoE block 0")  # what was reported before


def test_a_bad_patch_embedding_is_blamed_on_the_embedding(model_and_cfg):
    model, _ = model_and_cfg
    watch = NonFiniteWatch(model)
    x = torch.ones(8, 3, 16, 16)
    with torch.no_grad():
        model.patch_embed.proj.weight.fill_(3e38)  # finite weights whose output overflows
    assert not _forward(model, x)
    assert watch.source(0, 1) == "the patch embedding's output is not finite on rank 0 (its input was)"
    with torch.no_grad():
        model.pos_embed[0, 0, 0] = float("inf")
    assert not _forward(model, x)
    assert watch.source(0, 1) == "the patch embedding has non-finite weights (pos_embed) on rank 0"


def test_a_bad_router_is_left_to_the_router_check(model_and_cfg):
    model, _ = model_and_cfg
    watch = NonFiniteWatch(model)
    with torch.no_grad():
        next(moe_layers(model)[1].router.parameters()).fill_(float("nan"))
    assert not _forward(model, torch.randn(8, 3, 16, 16))
    assert watch.source(0, 1) == ""


def test_evaluation_forwards_leave_the_last_training_forward_alone(model_and_cfg):
    model, _ = model_and_cfg
    watch = NonFiniteWatch(model)
    _forward(model, torch.full((8, 3, 16, 16), float("nan")))
    model.eval()
    _forward(model, torch.randn(8, 3, 16, 16))
    assert watch.source(0, 1).startswith("the input batch")
