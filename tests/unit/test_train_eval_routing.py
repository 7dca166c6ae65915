"""The routing heatmaps of an evaluation (train/eval_routing.py): recorded on the evaluation's own forwards (the same
matrices as `vimoe analyze routing`'s pass over those batches), padding left out, bounded in images, the layers
left as they were; drawn as one PNG per MoE layer; a failure to draw is one warning and training goes on. The real
run in tests/multiproc/test_metrics_training.py reads them back from TensorBoard."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from vimoe_dist.analysis.collect import run_routing
from vimoe_dist.config import load_config
from vimoe_dist.metrics import build_metrics
from vimoe_dist.model import build_model, moe_layers
from vimoe_dist.train.boundary import send_heatmaps
from vimoe_dist.train.eval_routing import EvalRouting
from vimoe_dist.train.evaluate import evaluate

pytest.importorskip("matplotlib")
CPU = torch.device("cpu")
TINY = [
    "model.backbone=vit_tiny_patch16_224", "model.img_size=16", "model.num_classes=10",
    "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}",
    "model.moe.layers=last-2", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.group_size=4",
    "model.moe.routing=token",
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    return build_model(cfg.model)


def batches(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    valid = torch.tensor([True] * 6 + [False] * 2)  # the validation loader's padding: run, never counted
    return [{"image": torch.randn(8, 3, 16, 16, generator=gen), "label": torch.randint(0, 10, (8,), generator=gen),
             "valid": valid} for _ in range(n)]  # fmt: skip


@pytest.mark.slow  # matplotlib draws two figures: a few seconds
def test_routing_is_recorded_on_the_evaluation_forwards_up_to_a_bound(model, tmp_path):
    layers = moe_layers(model)
    data = batches(4)
    routing = EvalRouting(layers, 10, max_images=15)
    with routing:
        result = evaluate(model, data, CPU, on_batch=routing.update)
    assert result == evaluate(model, data, CPU)  # recording changes nothing the evaluation reports
    assert routing.images == 18  # 6 real images per batch; recording stopped once 15 were reached
    assert all(not m.record_routing and m.last_assignment is None for m in layers.values())
    reference = run_routing(model, data[:3], 10)  # the analysis command's own pass over the recorded batches
    for block, layer in routing.acc.layers.items():
        assert layer.images_C.sum() == 18
        assert torch.equal(layer.image_weight_CE, reference.routing.layers[block].image_weight_CE)
        assert torch.equal(layer.token_weight_CE, reference.routing.layers[block].token_weight_CE)
    paths = routing.draw(tmp_path / "routing", step=4)
    assert sorted(paths) == ["routing/block_1", "routing/block_2"]
    assert [p.name for p in paths.values()] == ["block_01.png", "block_02.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths.values())


def test_a_heatmap_that_cannot_be_drawn_is_one_warning(model, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    cfg = load_config(None, ["metrics.tensorboard=true", "train.progress=false"])
    metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=4)
    routing = EvalRouting(moe_layers(model), 10)
    with routing:
        evaluate(model, batches(1), CPU, on_batch=routing.update)
    (tmp_path / "routing").write_text("a file where the heatmaps' directory goes\n")
    job = types.SimpleNamespace(run_dir=tmp_path, cfg=cfg, metrics=metrics)  # what send_heatmaps reads of a Job
    with caplog.at_level(logging.WARNING):
        send_heatmaps(job, routing, 4)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("metrics: the routing heatmaps of step 4 were not drawn (")
    assert metrics.accepts_images  # the tracker is still there for the next evaluation
    metrics.close()
