"""`vimoe prune` building blocks: the dense FFN that replaces an MoE FFN (exact where it should be), pruning a
ViMoE in place, and writing a state dict that `model.pretrained` loads."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Mlp

from vimoe_dist.analysis.loading import load_weights_file
from vimoe_dist.analysis.prune import (
    averaged_expert,
    concat_mlps,
    dense_ffn,
    parse_keep_layers,
    prune_model,
    read_dense_ffn_sizes,
    save_pruned,
)
from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError
from vimoe_dist.model import build_model, build_moe, moe_layers

TINY = [
    "model.img_size=28",
    "model.num_classes=10",
    "model.backbone=vit_small_patch14_dinov2",
    "model.backbone_kwargs={embed_dim: 32, num_heads: 2, depth: 4}",
    "model.moe.num_experts=4",
    "model.moe.group_size=2",
    "model.moe.layers=last-2",
]


def _moe(shared: bool, top_k: int = 2):
    cfg = load_config(
        None,
        [
            *TINY,
            f"model.moe.shared_expert={shared}",
            f"model.moe.top_k={top_k}",
            "model.moe.routing=token",
            "model.moe.renormalize=true",
            "model.moe.capacity_factor=null",
        ],
    )
    return build_moe(16, 48, cfg.model.moe).eval(), cfg


def test_concat_mlps_is_the_sum() -> None:
    torch.manual_seed(0)
    a, b = Mlp(16, 24), Mlp(16, 40)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(concat_mlps(a, b)(x), a(x) + b(x), rtol=1e-5, atol=1e-6)
    assert concat_mlps(a, b).fc1.out_features == 64


@pytest.mark.parametrize("shared", [True, False])
def test_average_of_identical_experts_is_exact(shared: bool) -> None:
    # upcycled: every expert a copy of one FFN (halved output next to a shared expert); renormalised top-2 weights sum
    # to one and nothing is dropped, so the MoE computes the FFN and so must its dense replacement
    torch.manual_seed(1)
    layer, _ = _moe(shared)
    ffn = Mlp(16, 48)
    scale = 0.5 if shared else 1.0
    layer.experts.copy_from_mlp(ffn, out_scale=scale)
    if shared:
        layer.shared.load_state_dict(ffn.state_dict())
        with torch.no_grad():
            layer.shared.fc2.weight.mul_(0.5)
            layer.shared.fc2.bias.mul_(0.5)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), ffn(x), rtol=1e-5, atol=1e-5)
    gate = torch.tensor([0.1, 0.5, 0.3, 0.1])  # sums to one: renormalised weights
    dense = dense_ffn(layer, "average", gate)
    assert isinstance(dense, Mlp)
    assert dense.fc1.out_features == (96 if shared else 48)
    torch.testing.assert_close(dense(x), ffn(x), rtol=1e-5, atol=1e-5)
    if shared:
        torch.testing.assert_close(dense_ffn(layer, "shared")(x), layer.shared(x))


def test_average_weights_experts_by_load_by_hand() -> None:
    torch.manual_seed(2)
    layer, _ = _moe(shared=False)
    bank = layer.experts
    gate = torch.tensor([0.6, 0.2, 0.0, 0.0])  # mean gate per token; total 0.8
    avg = averaged_expert(layer, gate)
    torch.testing.assert_close(avg.fc1.weight, 0.75 * bank.fc1_weight[0] + 0.25 * bank.fc1_weight[1])
    torch.testing.assert_close(avg.fc1.bias, 0.75 * bank.fc1_bias[0] + 0.25 * bank.fc1_bias[1])
    torch.testing.assert_close(avg.fc2.weight, 0.8 * (0.75 * bank.fc2_weight[0] + 0.25 * bank.fc2_weight[1]))
    torch.testing.assert_close(avg.fc2.bias, 0.6 * bank.fc2_bias[0] + 0.2 * bank.fc2_bias[1])


def test_mode_errors() -> None:
    layer, _ = _moe(shared=False)
    with pytest.raises(UserError, match="no shared expert"):
        dense_ffn(layer, "shared")
    with pytest.raises(UserError, match="no token"):
        dense_ffn(layer, "average", torch.zeros(4))
    with pytest.raises(UserError, match="not an MoE block"):
        parse_keep_layers("1,3", [2, 3])
    with pytest.raises(UserError, match="comma-separated"):
        parse_keep_layers("last-2", [2, 3])
    assert parse_keep_layers("none", [2, 3]) == []
    assert parse_keep_layers("3, 2", [2, 3]) == [2, 3]


@pytest.mark.parametrize(
    ("mode", "shared"), [("shared", True), ("average", False), ("average", True)], ids=["shared", "avg", "avg+shared"]
)
def test_pruned_model_saves_and_loads(tmp_path, mode: str, shared: bool) -> None:
    torch.manual_seed(3)
    cfg = load_config(None, [*TINY, f"model.moe.shared_expert={shared}"])
    model = build_model(cfg.model).eval()
    assert list(moe_layers(model)) == [2, 3]
    gates = {2: torch.tensor([0.3, 0.3, 0.2, 0.1]), 3: torch.tensor([0.25] * 4)}
    pruned = prune_model(model, [3], mode, gates)
    assert pruned == [2]
    assert list(moe_layers(model)) == [3]
    assert isinstance(model.blocks[2].mlp, Mlp)
    x = torch.randn(2, 3, 28, 28)
    want = model(x)
    path = save_pruned(model, tmp_path)
    wide = mode == "average" and shared
    assert read_dense_ffn_sizes(path) == {0: 128, 1: 128, 2: 256 if wide else 128}
    new_cfg = copy.deepcopy(cfg)
    new_cfg.model.moe.layers = [3]
    new_cfg.model.pretrained = str(path)
    if wide:
        # the dense FFN holds both hidden layers (2 x 128): wider than the backbone's, build_model alone cannot fit it
        loaded = load_weights_file(new_cfg, path).eval()
        assert loaded.blocks[2].mlp.fc1.out_features == 256
    else:
        loaded = build_model(new_cfg.model).eval()  # the path the trainer takes for model.pretrained
    torch.testing.assert_close(loaded(x), want)
    assert list(moe_layers(loaded)) == [3]
