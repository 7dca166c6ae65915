"""The gradient norm of the log record (train/grad_norm.py) on one process: every gradient counted once, experts
included, and fp16's loss scale divided out. fp16 needs a GPU, which this machine lacks: the fp16 case runs against
a stand-in with the attributes DeepSpeed's FP16_UnfusedOptimizer has (its class name, `loss_scale_config`). Real
engines in every precision and stage, and 2 expert-parallel ranks: tests/multiproc/test_metrics_grad_norm.py."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from vimoe_dist.train.grad_norm import GradNorm


def model_with_grads(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[1].weight.allreduce = False  # an expert parameter, as `parallelize` tags them
    model(torch.randn(3, 4)).square().sum().mul(scale).backward()
    return model


class FP16_UnfusedOptimizer:  # DeepSpeed's class name is what GradNorm looks at
    def __init__(self, scale: float, scaling: bool) -> None:
        self._global_grad_norm = 123.0  # what DeepSpeed would report: left unused
        self.loss_scale_config = types.SimpleNamespace(cur_scale=scale, use_grad_scaling=scaling)


def reference(model: nn.Module, scale: float = 1.0) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() / scale


def test_a_plain_optimizer_gets_the_norm_of_every_gradient():
    model = model_with_grads()
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()))  # fp32 ZeRO-0: ours as is
    norm = GradNorm(engine, model, world_size=1, ep_size=1)
    assert norm.own and len(norm.experts) == 1 and len(norm.dense) == 3
    assert norm.take() is None  # nothing captured yet
    norm.capture()
    assert norm.take() == pytest.approx(reference(model), rel=1e-6)


def test_the_fp16_loss_scale_is_divided_out():
    model = model_with_grads(scale=1024.0)  # fp16's scaled backward
    engine = types.SimpleNamespace(optimizer=FP16_UnfusedOptimizer(1024.0, scaling=True))  # stand-in: no GPU here
    norm = GradNorm(engine, model, world_size=1, ep_size=1)
    norm.capture()
    assert norm.own and norm.take() == pytest.approx(reference(model, 1024.0), rel=1e-6)
    unscaled = types.SimpleNamespace(optimizer=FP16_UnfusedOptimizer(1024.0, scaling=False))  # bf16: no scaling
    norm = GradNorm(unscaled, model, world_size=1, ep_size=1)
    norm.capture()
    assert norm.take() == pytest.approx(reference(model), rel=1e-6)


def test_deepspeeds_own_norm_is_taken_where_it_counts_every_gradient():
    zero = types.SimpleNamespace(_global_grad_norm=2.5)  # a ZeRO 1/2 optimizer
    engine = types.SimpleNamespace(optimizer=zero, get_global_grad_norm=lambda: 2.5)
    norm = GradNorm(engine, model_with_grads(), world_size=1, ep_size=1)
    norm.capture()  # nothing to compute
    assert not norm.own and norm.value is None and norm.take() == 2.5
