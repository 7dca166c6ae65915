"""Routing analysis on a real (tiny) ViMoE: a router planted so that the class decides the expert is found and
kept, a collapsed one is called redundant, every real image is counted once per layer and padding never."""

from __future__ import annotations

import json

import pytest
import torch

from vimoe_dist.analysis.collect import run_routing
from vimoe_dist.analysis.report import build_report, summary_lines, write_report
from vimoe_dist.config import load_config
from vimoe_dist.model import build_model, moe_layers

C, E = 10, 4
TINY = [
    "model.img_size=28",
    f"model.num_classes={C}",
    "model.backbone=vit_small_patch14_dinov2",
    # no LayerScale: DINOv2's 1e-5 init would make every block (and so the routing input) nearly image-independent
    "model.backbone_kwargs={embed_dim: 32, num_heads: 2, depth: 4, init_values: null}",
    f"model.moe.num_experts={E}",
    "model.moe.group_size=2",
    "model.moe.layers=last-2",
    "model.moe.top_k=1",
    "model.moe.pool=mean",
    "model.moe.capacity_factor=null",
]


def _images(proto: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=gen)
    return proto[labels] + 0.5 * torch.randn(n, 3, 28, 28, generator=gen), labels


@pytest.fixture(scope="module")
def planted():
    """Block 3's gate fitted (least squares on its own inputs) to send class c to expert c % E; block 2's zeroed,
    so every image ties and goes to expert 0."""
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model).eval()
    proto = torch.randn(C, 3, 28, 28)
    layers = moe_layers(model)
    seen = []
    hook = layers[3].router.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    x, y = _images(proto, 200, seed=1)
    with torch.no_grad():
        model(x)
    hook.remove()
    target = torch.nn.functional.one_hot(y % E, E).float() * 20 - 5
    with torch.no_grad():
        layers[3].router.gate.weight.copy_(torch.linalg.lstsq(torch.cat(seen), target).solution.T)
        layers[2].router.gate.weight.zero_()
    return model, proto


def test_planted_router_is_found_and_kept(planted, tmp_path) -> None:
    model, proto = planted
    x, y = _images(proto, 160, seed=2)  # fresh images, not the ones the gate was fitted on
    result = run_routing(model, [(x[i : i + 20], y[i : i + 20]) for i in range(0, 160, 20)], C)
    report = build_report(result.routing, result.top1, result.images, depth=4)
    print("\n".join(summary_lines(report)))
    layer3, layer2 = report["layers"]["3"], report["layers"]["2"]
    assert layer3["specialisation"] > 0.9 and layer3["purity"] > 0.9
    assert layer2["image_dependence"] < 0.01 and layer2["load_cv"] == pytest.approx(3**0.5)
    assert report["recommendation"]["keep"] == [3]
    assert report["recommendation"]["redundant"] == [2]
    # the MoE layers' own statistics agree with the matrices: top-1 routing, nothing dropped
    assert layer3["routing_degree"] == pytest.approx(1.0) and layer3["dropped_tokens"] == 0
    paths = write_report(tmp_path, report, result.routing)
    assert json.loads(paths[0].read_text())["recommendation"]["keep"] == [3]
    assert sorted(p.name for p in (tmp_path / "heatmaps").iterdir()) == ["block_02.png", "block_03.png"]
    assert (tmp_path / "overview.png").read_bytes()[:4] == b"\x89PNG"


def test_every_real_image_counted_once_per_layer_and_top1(planted) -> None:
    model, proto = planted
    x, y = _images(proto, 40, seed=3)
    valid = torch.ones(40, dtype=torch.bool)
    valid[-6:] = False  # the validation loader's padding
    batches = [{"image": x[i : i + 10], "label": y[i : i + 10], "valid": valid[i : i + 10]} for i in range(0, 40, 10)]
    result = run_routing(model, batches, C)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    assert result.images == 34
    assert result.correct == int((pred == y)[valid].sum())
    want = torch.bincount(y[valid], minlength=C).double()
    num_tokens = x.shape[-1] ** 2 // 14**2 + 1
    for layer in result.routing.layers.values():
        torch.testing.assert_close(layer.images_C, want)
        torch.testing.assert_close(layer.image_weight_CE.sum(1) + layer.images_dropped_C, want)
        torch.testing.assert_close(layer.tokens_C, want * num_tokens)
    assert all(not layer.record_routing and layer.last_assignment is None for layer in moe_layers(model).values())
