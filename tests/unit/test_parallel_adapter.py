"""The expert-parallel seams that need no process group: the adapter DeepSpeed sees, the MoE layers found through
it, and the per-expert state-dict keys of a sharded bank (parallel/checkpoint_layout.py), on one process."""

from __future__ import annotations

import pytest
import torch

from vimoe_dist.config import load_config
from vimoe_dist.model import MoEFFN, aux_loss, build_model, moe_layers
from vimoe_dist.parallel.adapter import DeepSpeedMoEAdapter
from vimoe_dist.parallel.checkpoint_layout import EXPERT_KEY_RE, PER_EXPERT_KEY, single_device_key
from vimoe_dist.parallel.parallelize import shard_experts

TINY = [
    "model.backbone=vit_tiny_patch16_224",
    "model.img_size=16",
    "model.num_classes=3",
    "model.backbone_kwargs={patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2}",
    "model.moe.layers=last-1",
    "model.moe.num_experts=4",
    "model.moe.group_size=2",
]


def wrapped_model(ep_size: int = 2, ep_rank: int = 1):
    """What `parallelize` makes of the tiny model on expert-parallel rank `ep_rank`, without the all-to-all."""
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model)
    layer = model.blocks[1].mlp
    shard_experts(layer.experts, ep_rank, ep_size)
    model.blocks[1].mlp = DeepSpeedMoEAdapter(layer, ep_size)
    return model, layer


def test_the_adapter_hides_nothing_and_passes_nothing_through():
    model, layer = wrapped_model()
    adapter = model.blocks[1].mlp
    assert adapter.layer is layer and moe_layers(model) == {1: layer}
    # no attribute of the layer is read through the adapter: DeepSpeed's attributes only
    assert not hasattr(adapter, "router") and not hasattr(adapter, "last_stats")
    assert (adapter.num_experts, adapter.num_local_experts, adapter.expert_group_name) == (4, 2, "ep_size_2")
    # the forward goes through the adapter to the layer (all experts local at ep_size 1)
    model, layer = wrapped_model(ep_size=1, ep_rank=0)
    model(torch.randn(2, 3, 16, 16))
    assert aux_loss(model) > 0 and aux_loss(model) == layer.aux_loss.float()


def test_the_adapter_only_checks_what_deepspeed_calls():
    model, _ = wrapped_model()
    with pytest.raises(RuntimeError, match="call parallelize before the engine"):
        model.blocks[1].mlp.set_deepspeed_parallelism(False)  # no group was made in this process


def test_a_sharded_bank_saves_one_key_per_expert_under_deepspeeds_pattern():
    model, layer = wrapped_model(ep_size=2, ep_rank=1)
    state = model.state_dict()
    experts = sorted(k for k in state if PER_EXPERT_KEY in k)
    assert experts[0] == "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc1_bias"
    assert len(experts) == 2 * 4  # 2 local experts x 4 parameters
    assert all(EXPERT_KEY_RE.match(k) for k in experts)
    assert state["blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc1_weight"].shape == (64, 16)
    assert single_device_key("blocks.1.mlp.deepspeed_moe.router.gate.weight") == "blocks.1.mlp.router.gate.weight"
    # and back: the stacked bank of this rank (experts 2 and 3 of the unsharded one) loads from those keys
    fresh, _ = wrapped_model(ep_size=2, ep_rank=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.blocks[1].mlp.layer.experts.fc1_weight, layer.experts.fc1_weight)
    assert isinstance(moe_layers(fresh)[1], MoEFFN)
