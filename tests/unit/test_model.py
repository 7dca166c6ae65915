"""ViMoE construction: upcycling preserves the function, gradients reach everything, image routing, bad config."""

import copy

import pytest
import torch

from vimoe_dist.config import ConfigError, load_config
from vimoe_dist.model import MoEFFN, build_dense, build_model, build_moe, moe_layers, upcycle

SMOKE = ["model.img_size=28", "model.num_classes=10", "model.moe.num_experts=4", "model.moe.group_size=2"]
TINY = "model.backbone_kwargs={embed_dim: 64, num_heads: 2, depth: 4}"


def smoke_cfg(*overrides, backbone="vit_small_patch14_dinov2"):
    return load_config(None, [*SMOKE, f"model.backbone={backbone}", *overrides])


def dense_with_unit_layer_scale(cfg):
    """DINOv2 initialises LayerScale at 1e-5, which would hide any difference in the FFN output: set it to one."""
    torch.manual_seed(0)
    dense = build_dense(cfg.model).eval()
    with torch.no_grad():
        for block in dense.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    return dense


@pytest.mark.parametrize("backbone", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("routing", ["image", "token"])
@pytest.mark.parametrize("shared", [True, False])
def test_upcycle_preserves_logits(backbone, routing, shared):
    cfg = smoke_cfg(
        "model.backbone_kwargs={depth: 4}",  # ViT-S/14 DINOv2 widths, fewer blocks to keep the test quick
        "model.moe.layers=last-3",
        "model.moe.router=tc-softmax",
        "model.moe.renormalize=true",
        "model.moe.capacity_factor=null",
        f"model.moe.routing={routing}",
        f"model.moe.shared_expert={shared}",
        backbone=backbone,
    )
    dense = dense_with_unit_layer_scale(cfg)
    x = torch.randn(4, 3, 28, 28)
    ref = dense(x)
    moe = upcycle(copy.deepcopy(dense), cfg.model.moe).eval()
    assert len(moe_layers(moe)) == 3
    torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)
    # the comparison can fail: break the copies and the logits move
    with torch.no_grad():
        moe_layers(moe)[3].experts.fc1_weight.add_(torch.randn_like(moe_layers(moe)[3].experts.fc1_weight))
    assert (moe(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("router", ["tc-softmax", "tc-sinkhorn", "ec-softmax", "ec-sinkhorn"])
@pytest.mark.parametrize("routing", ["image", "token"])
def test_forward_backward_reaches_every_parameter(router, routing):
    cfg = smoke_cfg(
        TINY,
        "model.moe.layers=last-2",
        f"model.moe.router={router}",
        f"model.moe.routing={routing}",
        "model.moe.top_k=4",  # every unit to every expert: no expert is left without rows
        "model.moe.capacity_factor=2.0",
        "model.moe.switch_loss=0.01",
        "model.moe.z_loss=0.001",
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    x = torch.randn(8, 3, 28, 28)
    logits = model(x)
    assert logits.shape == (8, 10)
    loss = logits.logsumexp(-1).mean() + sum(m.aux_loss for m in moe_layers(model).values())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # every expert must have seen rows for this to be meaningful
    for layer in moe_layers(model).values():
        assert (layer.last_stats["tokens"] > 0).all()
    assert no_grad == []


def test_image_routing_sends_all_tokens_of_an_image_together():
    cfg = smoke_cfg("model.moe.routing=image", "model.moe.top_k=1", "model.moe.capacity_factor=4.0")
    torch.manual_seed(0)
    layer = build_moe(16, 32, cfg.model.moe)
    layer.record_routing = True
    layer(torch.randn(4, 5, 16))
    a = layer.last_assignment  # [B, N, E]
    assert a.shape == (4, 5, 4)
    assert torch.equal(a, a[:, :1].expand_as(a))
    assert ((a > 0).sum(-1) == 1).all()


def test_token_routing_differs_per_token():
    cfg = smoke_cfg("model.moe.routing=token", "model.moe.top_k=1", "model.moe.capacity_factor=4.0")
    torch.manual_seed(0)
    layer = build_moe(16, 32, cfg.model.moe)
    layer.record_routing = True
    layer(torch.randn(4, 50, 16))
    chosen = layer.last_assignment.argmax(-1)
    assert not torch.equal(chosen, chosen[:, :1].expand_as(chosen))


@pytest.mark.parametrize("routing", ["image", "token"])
def test_groups_do_not_interact(routing):
    cfg = smoke_cfg(f"model.moe.routing={routing}", "model.moe.capacity_factor=1.0", "model.moe.top_k=1")
    torch.manual_seed(0)
    layer = build_moe(16, 32, cfg.model.moe).eval()
    x = torch.randn(4, 6, 16)
    y = layer(x)
    x2 = x.clone()
    x2[2:] = torch.randn(2, 6, 16) * 3  # the second group of two images changes
    y2 = layer(x2)
    torch.testing.assert_close(y2[:2], y[:2])
    assert not torch.allclose(y2[2:], y[2:])


def test_dense_baseline_has_no_moe():
    model = build_model(smoke_cfg("model.moe.layers=last-0").model)
    assert moe_layers(model) == {}
    assert not any(isinstance(m, MoEFFN) for m in model.modules())


def test_pretrained_file_is_upcycled(tmp_path):
    cfg = smoke_cfg(TINY, "model.moe.layers=[1, 3]", "model.moe.renormalize=true", "model.moe.capacity_factor=null")
    dense = dense_with_unit_layer_scale(cfg)
    path = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict()}, path)
    cfg.model.pretrained = str(path)
    moe = build_model(cfg.model).eval()
    assert sorted(moe_layers(moe)) == [1, 3]
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_pretrained_vimoe_state_dict_loads_as_is(tmp_path):
    from safetensors.torch import save_file

    cfg = smoke_cfg(TINY, "model.moe.layers=last-2")
    torch.manual_seed(1)
    model = build_model(cfg.model).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg.model.pretrained = str(path)
    again = build_model(cfg.model).eval()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(again(x), model(x))


def test_pretrained_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    other = build_dense(smoke_cfg("model.backbone_kwargs={embed_dim: 192, num_heads: 3}").model)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ConfigError, match=r"model.pretrained.*does not fit"):
        build_model(smoke_cfg(f"model.pretrained={path}").model)


def test_pickled_objects_need_trust(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": object()}, path)
    with pytest.raises(ConfigError, match="trust_checkpoint"):
        build_model(smoke_cfg(f"model.pretrained={path}").model)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ([TINY, "model.moe.layers=last-5"], "model.moe.layers"),
        ([TINY, "model.moe.layers=[4]"], "model.moe.layers"),
        (["model.backbone=not_a_vit"], "model.backbone"),
        (["model.pretrained=/nonexistent/ckpt.pth"], "model.pretrained"),
    ],
)
def test_bad_model_config(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model(smoke_cfg(*overrides).model)


def test_group_size_must_divide_batch():
    layer = build_moe(16, 32, smoke_cfg("model.moe.group_size=3").model.moe)
    with pytest.raises(ValueError, match=r"model\.moe\.group_size"):
        layer(torch.randn(4, 5, 16))


def test_dense_ffn_hidden_widens_blocks_and_loads_a_pruned_file(tmp_path):
    from safetensors.torch import save_file

    cfg = smoke_cfg(TINY, "model.moe.layers=[3]", "model.dense_ffn_hidden={2: 512}")
    model = build_model(cfg.model)
    assert model.blocks[2].mlp.fc1.out_features == 512 and model.blocks[1].mlp.fc1.out_features == 256
    path = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg.model.pretrained = str(path)
    again = build_model(cfg.model).eval()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(again(x), model.eval()(x))
    with pytest.raises(ConfigError, match="dense_ffn_hidden"):
        build_model(smoke_cfg(TINY, "model.dense_ffn_hidden={9: 512}").model)
