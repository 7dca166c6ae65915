"""Model FLOPs per image (vimoe_dist/model/flops.py) against values derived by hand for a tiny ViT, and against
torch's own FlopCounterMode on a real forward (and forward + backward) of the same model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vimoe_dist.config import load_config
from vimoe_dist.model import build_model
from vimoe_dist.model.flops import (
    TRAIN_FLOPS_PER_FORWARD,
    expert_flops,
    last_expert_rows,
    model_flops,
    nominal_expert_rows,
    tokens_per_image,
)

# a tiny ViT: 16 px images, patch 4 -> 16 patches + 1 class token = 17 tokens; D 32, H 128 (mlp_ratio 4), 3 blocks,
# 2 heads, 10 classes; MoE in the last 2 blocks with 4 experts, top-2, a shared expert
IMG, P, C, D, H, DEPTH, K, E = 16, 4, 3, 32, 128, 3, 10, 4
PATCHES = (IMG // P) ** 2
N = PATCHES + 1


def _model(*overrides: str, moe_layer=None):
    cfg = load_config(
        None,
        [
            "model.backbone=vit_tiny_patch16_224", f"model.img_size={IMG}", f"model.num_classes={K}",
            f"model.backbone_kwargs={{patch_size: {P}, embed_dim: {D}, depth: {DEPTH}, num_heads: 2}}",
            "model.moe.layers=last-2", f"model.moe.num_experts={E}", "model.moe.top_k=2", "model.moe.group_size=4",
            *overrides,
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    if moe_layer is not None:
        return build_model(cfg.model, moe_layer=moe_layer).eval()
    return build_model(cfg.model).eval()


# by hand, per image (2 FLOPs per multiply-add)
PATCH_EMBED = 2 * PATCHES * (C * P * P) * D  # 16 * 48 * 32 * 2 = 49,152
ATTN_LINEAR = 2 * N * D * 3 * D + 2 * N * D * D  # qkv + proj = 139,264 per block
ATTN_SCORES = 2 * 2 * N * N * D  # Q K^T and A V = 36,992 per block
FFN = 2 * 2 * N * D * H  # fc1 + fc2 = 278,528
HEAD = 2 * D * K  # one pooled token = 640


def test_dense_and_moe_parts_match_the_hand_derivation():
    f = model_flops(_model())  # image routing, token-choice top-2: nominal rows 2 * N per image
    assert f.patch_embed == PATCH_EMBED
    assert f.attention == DEPTH * ATTN_LINEAR
    assert f.attention_scores == DEPTH * ATTN_SCORES
    assert f.dense_ffn == 1 * FFN  # one dense block
    assert f.shared_expert == 2 * FFN
    assert f.router == 2 * (2 * 1 * D * E)  # one routing unit (the image) per MoE block
    assert f.routed_experts == 2 * (2 * FFN)  # top-2: every token through two experts
    assert f.head == HEAD
    forward = PATCH_EMBED + DEPTH * (ATTN_LINEAR + ATTN_SCORES) + FFN + 2 * (FFN + 2 * D * E + 2 * FFN) + HEAD
    assert f.forward == forward == 2_528_768
    assert f.training == 3 * forward and TRAIN_FLOPS_PER_FORWARD == 3
    assert f.fixed == forward - 4 * FFN


def test_routers_nominal_rows():
    assert tokens_per_image(_model()) == N
    token = _model("model.moe.routing=token")
    assert nominal_expert_rows(token) == {1: 2 * N, 2: 2 * N}
    assert model_flops(token).router == 2 * (2 * N * D * E)  # a unit per token
    # expert choice: C = ceil(k U cf / E) = ceil(2 * 4 * 1.25 / 4) = 3 slots per expert per group of 4 images
    ec = _model("model.moe.router=ec-softmax")
    assert nominal_expert_rows(ec) == {1: E * 3 * N / 4, 2: E * 3 * N / 4}
    # Soft MoE, 2 slots per expert, image routing: E * S slots of N rows per group of 4 images; the slot mixing
    # multiplies every token with every slot twice (dispatch, combine)
    soft = _model("model.moe.router=soft", "model.moe.slots_per_expert=2", "model.moe.switch_loss=0")
    f = model_flops(soft)
    assert nominal_expert_rows(soft) == {1: E * 2 * N / 4, 2: E * 2 * N / 4}
    assert f.router == 2 * (2 * D * E * 2)
    assert f.soft_mixing == 2 * (2 * 2 * N * D * E * 2)


def test_expert_flops_take_the_rows_the_layer_reports():
    model = _model("model.moe.capacity_factor=null")  # dropless: each of the 8 images' N tokens to 2 experts
    model(torch.randn(8, C, IMG, IMG))
    rows = last_expert_rows(model)
    assert sorted(rows) == [1, 2] and all(len(r) == E for r in rows.values())
    assert all(sum(r) == 8 * 2 * N for r in rows.values())
    assert expert_flops(model, rows) == sum(sum(r) for r in rows.values()) * 4 * D * H
    assert expert_flops(model, {1: torch.tensor([5, 0, 1, 2])}) == 8 * 4 * D * H
    with pytest.raises(ValueError, match="block 0 has no MoE FFN"):
        expert_flops(model, {0: [1, 2, 3, 4]})


def _counted(model, images, backward=False) -> int:
    for block in model.blocks:  # the explicit attention path: FlopCounterMode has no formula for CPU's fused SDPA
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("routing", ["image", "token"])
def test_forward_matches_torch_flop_counter_at_the_real_rows(routing):
    model = _model(f"model.moe.routing={routing}", "model.moe.capacity_factor=1.0")  # capacity 1.0 drops rows
    images = torch.randn(8, C, IMG, IMG)
    counted = _counted(model, images)
    rows = last_expert_rows(model)
    per_image = {i: sum(r) / 8 for i, r in rows.items()}
    assert model_flops(model, per_image).forward * 8 == counted
    assert expert_flops(model, rows) + model_flops(model).fixed * 8 == counted


def test_training_is_three_forwards_less_the_patch_embedding_input_gradient():
    model = _model("model.moe.capacity_factor=null").train()  # dropless: the nominal rows are the real ones
    images = torch.randn(8, C, IMG, IMG)
    counted = _counted(model, images, backward=True)
    f = model_flops(model)
    assert counted == 8 * (f.training - PATCH_EMBED)


def test_soft_moe_matches_torch_flop_counter():
    model = _model("model.moe.router=soft", "model.moe.switch_loss=0")
    assert model_flops(model).forward * 8 == _counted(model, torch.randn(8, C, IMG, IMG))


@pytest.mark.slow  # the reference layer imports DeepSpeed
def test_reference_layers_are_refused_in_one_line():
    from vimoe_dist.parallel.reference.deepspeed_moe import DeepSpeedMoEFFN

    model = _model("model.moe.routing=token", "model.moe.group_size=8", moe_layer=DeepSpeedMoEFFN)
    with pytest.raises(ValueError, match=r"counted only for ViMoE's own MoE layer \(MoEFFN\)"):
        model_flops(model)
