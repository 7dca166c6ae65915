"""Parity with DeepSpeed's top-1/top-2 gates and fairscale's GShard Top2Gate on the same weights, nothing dropped:
the same outputs. Both libraries' layers are the real ones (`vimoe_dist.parallel.reference`), passed as layer
factories in place of `build_moe`."""

import pytest
import torch

from vimoe_dist.config import load_config
from vimoe_dist.model import build_moe
from vimoe_dist.parallel.reference.deepspeed_moe import DeepSpeedMoEFFN
from vimoe_dist.parallel.reference.fairscale_moe import FairscaleMoEFFN

DIM, HIDDEN = 8, 16


def moe_cfg(*overrides):
    base = ["model.moe.router=tc-softmax", "model.moe.routing=token", "model.moe.bpr=false", "model.moe.switch_loss=0"]
    return load_config(None, [*base, *overrides]).model.moe


@torch.no_grad()
def distinct(experts):
    """DeepSpeed deep-copies one expert E times; identical experts would hide any routing difference."""
    for mlp in experts:
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return experts


@torch.no_grad()
def copy_into_ours(ours, gate_weight, experts, shared=None):
    ours.router.gate.weight.copy_(gate_weight)
    for i, mlp in enumerate(experts):
        ours.experts.fc1_weight[i].copy_(mlp.fc1.weight)
        ours.experts.fc1_bias[i].copy_(mlp.fc1.bias)
        ours.experts.fc2_weight[i].copy_(mlp.fc2.weight)
        ours.experts.fc2_bias[i].copy_(mlp.fc2.bias)
    if shared is not None:
        ours.shared.load_state_dict(shared.state_dict())


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_deepspeed_top_k_gate_parity(top_k, shared):
    # capacity factor 4 with 4 experts: an expert can hold every token, so nothing is dropped
    overrides = [
        f"model.moe.top_k={top_k}",
        "model.moe.num_experts=4",
        "model.moe.capacity_factor=4.0",
        f"model.moe.renormalize={top_k == 2}",
        f"model.moe.shared_expert={shared}",
    ]
    torch.manual_seed(0)
    x = torch.randn(2, 12, DIM)
    ref = DeepSpeedMoEFFN(DIM, HIDDEN, moe_cfg(*overrides)).eval()
    ours = build_moe(DIM, HIDDEN, moe_cfg(*overrides, "model.moe.group_size=2")).eval()
    layer = ref.moe.deepspeed_moe
    copy_into_ours(ours, layer.gate.wg.weight, distinct(layer.experts.deepspeed_experts), ref.shared)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    assert ours.last_stats["dropped"] == 0
    assert ours.last_stats["tokens"].tolist() == ref.last_stats["tokens"].tolist()


def test_deepspeed_parity_fails_when_weights_differ():
    overrides = [
        "model.moe.top_k=2",
        "model.moe.num_experts=4",
        "model.moe.capacity_factor=4.0",
        "model.moe.renormalize=true",
        "model.moe.shared_expert=false",
    ]
    torch.manual_seed(0)
    x = torch.randn(2, 12, DIM)
    ref = DeepSpeedMoEFFN(DIM, HIDDEN, moe_cfg(*overrides)).eval()
    ours = build_moe(DIM, HIDDEN, moe_cfg(*overrides, "model.moe.group_size=2")).eval()
    layer = ref.moe.deepspeed_moe
    copy_into_ours(ours, layer.gate.wg.weight * 1.5, distinct(layer.experts.deepspeed_experts))
    assert not torch.allclose(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def balanced_tokens():
    """8 tokens whose top-2 experts pair up (0,1) (2,3) (1,2) (3,0) twice: every expert gets exactly 2T/E = 4
    choices, GShard's fixed capacity, so nothing is dropped."""
    pairs = [(0, 1), (2, 3), (1, 2), (3, 0)] * 2
    x = torch.zeros(8, DIM)
    for t, (i, j) in enumerate(pairs):
        x[t, i], x[t, j] = 3.0 + 0.1 * t, 2.0
        x[t, 4:] = torch.randn(DIM - 4) * 0.1
    return x


def test_fairscale_top2_gate_parity(monkeypatch):
    import fairscale.nn.moe.top2gate as top2gate

    # GShard samples the second expert with Gumbel noise; zero noise makes it the second-best gate, as ours
    monkeypatch.setattr(top2gate, "gumbel_rsample", lambda shape, device: torch.zeros(shape, device=device))
    overrides = [
        "model.moe.top_k=2",
        "model.moe.num_experts=4",
        "model.moe.capacity_factor=1.0",
        "model.moe.renormalize=true",
        "model.moe.shared_expert=false",
    ]
    torch.manual_seed(0)
    ref = FairscaleMoEFFN(DIM, HIDDEN, moe_cfg(*overrides)).eval()
    ours = build_moe(DIM, HIDDEN, moe_cfg(*overrides, "model.moe.group_size=1")).eval()
    gate = torch.zeros(4, DIM)
    gate[:, :4] = torch.eye(4)
    with torch.no_grad():
        ref.moe.gate.wg.weight.copy_(gate)
    copy_into_ours(ours, gate, distinct(ref.moe.experts))
    x = balanced_tokens()[None]
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    assert ours.last_stats["dropped"] == 0
    assert ref.last_stats["tokens"].tolist() == [4, 4, 4, 4] == ours.last_stats["tokens"].tolist()


def test_a_reference_layer_is_injected_as_the_layer_factory():
    from vimoe_dist.model import aux_loss, build_model, moe_layers

    cfg = load_config(
        None,
        [
            "model.backbone=vit_tiny_patch16_224",
            "model.img_size=16",
            "model.num_classes=3",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2}",
            "model.moe.layers=last-1",
            "model.moe.num_experts=4",
            "model.moe.routing=token",
        ],
    )
    model = build_model(cfg.model, moe_layer=DeepSpeedMoEFFN)
    layers = moe_layers(model)
    assert list(layers) == [1] and isinstance(layers[1], DeepSpeedMoEFFN)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert aux_loss(model) > 0


def test_fairscale_missing_is_one_line_saying_how_to_install_it(monkeypatch):
    import importlib
    import sys

    from vimoe_dist.errors import UserError

    monkeypatch.setitem(sys.modules, "fairscale", None)  # as if it were not installed: importing it raises
    for name in [m for m in sys.modules if m.startswith("fairscale.") or m.endswith(".fairscale_moe")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(UserError, match=r"pip install 'vimoe-dist\[fairscale\]'$"):
        importlib.import_module("vimoe_dist.parallel.reference.fairscale_moe")
