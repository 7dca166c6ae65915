"""The efficiency figures of the log record (train/efficiency.py): model FLOPs counted over every training forward of
an interval (micro-batches included) at the experts' real rows and checked against torch's FlopCounterMode, the record
built from them, the device peak and GPU memory (the GPU paths run against a stand-in for torch.cuda: this machine
has no GPU; the test says so where it does), and a model the counter does not handle (one warning, no figures)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vimoe_dist.config import load_config
from vimoe_dist.model import build_model, moe_layers
from vimoe_dist.model.flops import expert_flops, last_expert_rows, model_flops
from vimoe_dist.train import efficiency
from vimoe_dist.train.efficiency import Efficiency, device_peak, gpu_memory

CPU = torch.device("cpu")
TINY = [
    "model.backbone=vit_tiny_patch16_224", "model.img_size=16", "model.num_classes=10",
    "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}",
    "model.moe.layers=last-2", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.group_size=4",
    "model.moe.capacity_factor=1.0",  # drops tokens: the real rows are fewer than the nominal ones
]  # fmt: skip


def tiny(*overrides: str):
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_flops_of_every_training_forward_are_counted_at_their_real_rows():
    cfg, model = tiny()
    eff = Efficiency(cfg, model, moe_layers(model), CPU)
    fixed = model_flops(model).fixed
    for block in model.blocks:  # the explicit attention path: FlopCounterMode has no formula for CPU's fused SDPA
        block.attn.fused_attn = False
    expected, counted, images = 0.0, 0, 0
    for batch in (8, 4):  # two micro-batches of one step
        model.train()
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(batch, 3, 16, 16))
        rows = last_expert_rows(model)
        expected += expert_flops(model, rows)
        counted += counter.get_total_flops()
        images += batch
    assert sum(sum(r) for r in rows.values()) < 2 * 2 * 17 * 4  # capacity dropped some: not the nominal rows
    model.eval()
    model(torch.randn(4, 3, 16, 16))  # an evaluation forward is no training work
    assert eff.images == images
    experts = eff.take_expert_flops()
    assert experts.item() == pytest.approx(expected) and eff.take_expert_flops().item() == 0.0
    assert fixed * images + experts.item() == pytest.approx(counted, rel=1e-12)  # what torch counted, both forwards

    record = eff.record(seconds=2.0, expert_flops=experts.item(), images_per_sec=6.0)
    training = 3 * (fixed * images + expected)
    assert record["flops_per_image"] == pytest.approx(training / images)
    assert record["achieved_tflops"] == pytest.approx(training / 2.0 / 1e12)
    assert record["tokens_per_sec"] == 6.0 * 17  # 16 patches and the class token
    assert "mfu" not in record and not any(k.startswith("gpu_") for k in record)  # CPU, no peak configured
    assert eff.images == 0


def test_mfu_against_a_configured_peak_on_the_cpu():
    cfg, model = tiny("metrics.peak_tflops=0.002")
    eff = Efficiency(cfg, model, moe_layers(model), CPU)
    assert eff.peak_flops == 2e9
    model.train()
    model(torch.randn(4, 3, 16, 16))
    record = eff.record(1.0, eff.take_expert_flops().item(), 4.0)
    assert record["mfu"] == pytest.approx(record["achieved_tflops"] * 1e12 / 2e9)


def test_a_model_the_counter_cannot_count_is_one_warning_and_no_flop_figures(caplog):
    cfg, model = tiny("model.global_pool=map")  # an attention-pooling head: the counter refuses it
    with caplog.at_level(logging.WARNING, logger="vimoe.train"):
        eff = Efficiency(cfg, model, moe_layers(model), CPU)
    assert [r.getMessage() for r in caplog.records] == [
        "metrics: model FLOPs cannot be counted (ValueError: flops: attention-pooling heads (global_pool 'map') are "
        "not counted); flops_per_image, achieved_tflops and mfu are left out"
    ]
    model.train()
    model(torch.randn(4, 3, 16, 16))  # training goes on
    record = eff.record(1.0, eff.take_expert_flops().item(), 4.0)
    assert set(record) == {"tokens_per_sec"}


def test_the_cpu_has_no_peak_to_look_up():
    cfg = load_config(None, [])
    assert device_peak(cfg, CPU) is None
    assert device_peak(load_config(None, ["metrics.peak_tflops=1.5"]), CPU) == 1.5e12
    assert gpu_memory(CPU) == {}


class FakeCuda:
    """Stands in for torch.cuda on this machine, which has no GPU: the name a GPU reports and its allocator's
    counters, as torch returns them."""

    def __init__(self, name: str) -> None:
        self.name, self.resets = name, 0

    def get_device_name(self, device=None) -> str:
        return self.name

    def memory_allocated(self, device=None) -> int:
        return 3 << 30

    def memory_reserved(self, device=None) -> int:
        return 4 << 30

    def max_memory_allocated(self, device=None) -> int:
        return 5 << 30 if not self.resets else 3 << 30

    def reset_peak_memory_stats(self, device=None) -> None:
        self.resets += 1


GPU = torch.device("cuda", 0)


def test_a_known_gpu_gives_its_datasheet_peak_and_a_configured_peak_wins(monkeypatch):
    monkeypatch.setattr(efficiency.torch, "cuda", FakeCuda("NVIDIA H100 80GB HBM3"))  # no GPU here (module doc)
    assert device_peak(load_config(None, ["parallel.precision=bf16"]), GPU) == 989.5e12
    assert device_peak(load_config(None, ["parallel.precision=bf16", "metrics.peak_tflops=700"]), GPU) == 700e12
    monkeypatch.setattr(efficiency, "matmul_precision", lambda p: "tf32")  # fp32 matmuls on TF32 tensor cores
    assert device_peak(load_config(None, []), GPU) == 494.5e12


def test_an_unknown_gpu_without_a_peak_is_one_warning_on_rank_0_and_no_mfu(monkeypatch, caplog):
    monkeypatch.setattr(efficiency.torch, "cuda", FakeCuda("NVIDIA Future GPU 9000"))  # no GPU here (module doc)
    cfg = load_config(None, ["parallel.precision=bf16"])
    with caplog.at_level(logging.WARNING, logger="vimoe.train"):
        assert device_peak(cfg, GPU, is_main=True) is None
        assert device_peak(cfg, GPU, is_main=False) is None
    assert [r.getMessage() for r in caplog.records] == [
        "metrics: MFU is left out: no peak bf16 FLOP/s known for GPU 'NVIDIA Future GPU 9000': give its dense peak "
        "explicitly (metrics.peak_tflops=TFLOPS)"
    ]
    assert device_peak(load_config(None, ["parallel.precision=bf16", "metrics.peak_tflops=100"]), GPU) == 100e12


def test_gpu_memory_reports_the_peak_of_each_interval(monkeypatch):
    fake = FakeCuda("NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(efficiency.torch, "cuda", fake)  # no GPU here (module doc)
    first = gpu_memory(GPU)
    assert first == {"gpu_allocated_bytes": 3 << 30, "gpu_reserved_bytes": 4 << 30, "gpu_peak_allocated_bytes": 5 << 30}
    assert fake.resets == 1  # the next interval's peak starts from what is allocated now
    assert gpu_memory(GPU)["gpu_peak_allocated_bytes"] == 3 << 30
