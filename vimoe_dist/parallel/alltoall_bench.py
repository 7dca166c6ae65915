"""All-to-all bandwidth between the processes of one node, for `vimoe doctor --gpu-bench` (its worker runs one
process per device and calls `bench_alltoall`). Lives here because `vimoe_dist/parallel/` is the one home of
torch.distributed."""

from __future__ import annotations

import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bench_alltoall(spec: dict) -> dict:
    """`all_to_all_single` between the ranks of this node (one process per device) at each size: the slowest
    rank's median time, algorithm bandwidth size / time and bus bandwidth size / time * (n - 1) / n (nccl-tests'
    definition for all-to-all: the share of the buffer that actually crosses links)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = spec["backend"]
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=spec["timeout_s"])
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    rows = []
    try:
        for size in spec["sizes_bytes"]:
            size -= size % world
            send = torch.empty(size, dtype=torch.uint8, device=device).fill_(rank)
            recv = torch.empty_like(send)
            for _ in range(spec["warmup"]):
                dist.all_to_all_single(recv, send)
            samples = []
            for _ in range(spec["iters"]):
                dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                dist.all_to_all_single(recv, send)
                _sync(device)
                samples.append(time.perf_counter() - t0)
            slowest = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = slowest.item()
            expected = torch.arange(world, device=device, dtype=torch.uint8).repeat_interleave(size // world)
            correct = bool(torch.equal(recv, expected))
            algbw = size / seconds
            rows.append({"bytes": size, "ms": seconds * 1e3, "algbw_gbps": algbw / 1e9,
                         "busbw_gbps": algbw * (world - 1) / world / 1e9, "correct": correct})  # fmt: skip
    finally:
        dist.destroy_process_group()
    return {"world": world, "backend": backend, "device": _device_name(device), "sizes": rows}
