"""The code of `vimoe doctor --gpu-bench` run end to end on the CPU: the same functions and child processes the CLI
starts on a GPU node, with device "cpu" and backend "gloo" passed where the CLI passes "cuda" and "nccl" (this
machine has no GPU; the CUDA kernels themselves, NCCL and the MFU against a datasheet peak cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vimoe_dist.doctor.gpu_bench import run_gpu_bench
from vimoe_dist.doctor.result import OK, WARN

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
DIGITS = str(Path(__file__).parents[2] / "configs" / "digits.yaml")


def test_gpu_bench_code_path_on_cpu():
    lines: list[str] = []
    checks, payload = run_gpu_bench(
        DIGITS, [], num_devices=2, batch=8, device="cpu", backend="gloo", steps=1, warmup=1, rounds=1,
        sizes=(4096, 65536), write=lines.append,
    )  # fmt: skip
    by_name = {c.name: c for c in checks}
    assert [c.name for c in checks] == ["bench_experts", "bench_train_step", "bench_alltoall"]
    assert by_name["bench_train_step"].status == by_name["bench_alltoall"].status == OK

    experts = payload["experts"]  # the grouped path forced on the CPU against the loop: bf16 outputs and grads
    assert experts["match"] and set(experts["rel_errors"]) == {
        "output", "grad_input", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"
    }  # fmt: skip
    # timing on a shared CPU: a grouped path slower than the loop is the warning a GPU node would get for it
    assert by_name["bench_experts"].status == (WARN if experts["speedup"] < 1 else OK)
    assert experts["rows"] == 8 * 17 * 2 and sum(experts["counts"]) == experts["rows"] and 0 in experts["counts"]

    step = payload["step"]  # the trainer's engine, bf16, one process
    assert step["batch"] == 8 and step["precision"] == "bf16" and step["images_per_sec"] > 0
    flops = step["flops_per_image"]
    assert flops["training"] == 3 * flops["forward"] and flops["routed_experts"] > 0
    assert sorted(step["expert_rows"]) == ["4", "5"]  # the digits model's two MoE blocks (JSON keys)
    assert "mfu" not in step and "peak_allocated_bytes" not in step  # CPU: no device peak, no CUDA memory
    assert "images/s" in by_name["bench_train_step"].summary

    alltoall = payload["alltoall"]  # two processes exchanging real buffers
    assert alltoall["world"] == 2 and [r["bytes"] for r in alltoall["sizes"]] == [4096, 65536]
    assert all(r["correct"] and r["busbw_gbps"] > 0 for r in alltoall["sizes"])
    assert any(line.startswith("all-to-all, 2 ranks, gloo") for line in lines)
