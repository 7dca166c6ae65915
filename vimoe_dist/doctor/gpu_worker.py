"""The measurements of `vimoe doctor --gpu-bench`, each run in a child process started by `gpu_bench.py` (with a
deadline, and so that one part's CUDA state or memory peak does not leak into the next):

    python -m vimoe_dist.doctor.gpu_worker experts|step|alltoall --spec SPEC.json --out OUT.json

- `experts`: the expert bank's grouped-GEMM path (`F.grouped_mm`, one kernel for all experts) against its
  per-expert loop on the same bf16 weights and rows: outputs and gradients compared, forward + backward timed;
- `step`: bf16 training steps of a model through the trainer's own code (`init_distributed`, `build_engine`:
  build, parallelize, DeepSpeed engine with our AdamW), on random images: images/s, MFU, peak memory;
- `alltoall`: one process per GPU, `all_to_all_single` over NCCL at several sizes: bus bandwidth.

The device comes from the spec: the doctor passes CUDA and NCCL; the tests run the same code on the CPU (gloo).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vimoe_dist.parallel.alltoall_bench import bench_alltoall

# rows per expert as shares of the total: uneven, one expert empty (dropless routing can leave one idle)
EXPERT_SHARES = (0.22, 0.05, 0.18, 0.0, 0.15, 0.12, 0.2, 0.08)
BF16_REL_TOL = 2e-2  # relative L2 error allowed between the two paths (bf16 rounding, another summation order)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expert_counts(rows: int, num_experts: int) -> list[int]:
    shares = [EXPERT_SHARES[e % len(EXPERT_SHARES)] for e in range(num_experts)]
    counts = [int(rows * s / sum(shares)) for s in shares]
    counts[0] += rows - sum(counts)
    return counts


def bench_experts(spec: dict) -> dict:
    """Grouped GEMM against the per-expert loop, same bank, same rows: relative errors of the output and of the
    gradients (input, and every weight and bias) and the median time of forward + backward over interleaved rounds."""
    from vimoe_dist.model.moe.experts import GroupedExperts, grouped_mm_available

    device = torch.device(spec["device"])
    E, D, H, rows = spec["num_experts"], spec["dim"], spec["hidden"], spec["rows"]
    torch.manual_seed(0)
    bank = GroupedExperts(E, D, H).to(device=device, dtype=torch.bfloat16)
    counts = expert_counts(rows, E)
    x = torch.randn(rows, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(rows, D, device=device, dtype=torch.bfloat16)
    counts_t = torch.tensor(counts, device=device)
    result = {"experts": E, "dim": D, "hidden": H, "rows": rows, "counts": counts, "device": _device_name(device)}
    if device.type == "cuda" and not grouped_mm_available(x):
        return {**result, "skipped": "torch has no fused grouped GEMM here (needs F.grouped_mm, bf16, sm80+)"}

    def run(grouped: bool) -> list[torch.Tensor]:
        bank.grouped_mm = grouped
        x.grad = None
        bank.zero_grad(set_to_none=True)
        y = bank(x, counts_t)
        y.backward(grad_out)
        return [y.detach(), x.grad, *(p.grad for p in bank.parameters())]

    names = ["output", "grad_input", *(n for n, _ in bank.named_parameters())]
    loop, grouped = run(False), run(True)
    errors = {n: (g.float() - r.float()).norm().item() / max(r.float().norm().item(), 1e-12)
              for n, g, r in zip(names, grouped, loop)}  # fmt: skip
    result["rel_errors"] = errors
    result["match"] = all(e <= BF16_REL_TOL for e in errors.values())
    times: dict[str, list[float]] = {"loop": [], "grouped": []}
    for _ in range(spec.get("warmup", 3)):
        run(False), run(True)
    for _ in range(spec["rounds"]):
        for name, flag in (("loop", False), ("grouped", True)):
            _sync(device)
            t0 = time.perf_counter()
            run(flag)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    flops = 3 * 2 * 2 * rows * D * H  # forward (fc1, fc2) and the backward's two products per forward product
    for name, samples in times.items():
        seconds = statistics.median(samples)
        result[f"{name}_ms"] = seconds * 1e3
        result[f"{name}_tflops"] = flops / seconds / 1e12
    result["speedup"] = statistics.median(a / b for a, b in zip(times["loop"], times["grouped"]))
    return result


def bench_step(spec: dict) -> dict:
    """Training steps of the configured model through the trainer's code, on random images of the model's size.

    The data pipeline is left out on purpose (this measures the node's compute, not its disks); the time of a step is
    the median over `steps` after `warmup`; FLOPs are the model FLOPs of the last step's real expert rows, x3 for
    training (vimoe_dist.model.flops).
    """
    from vimoe_dist.config import load_config
    from vimoe_dist.metrics.flops import mfu, peak_flops
    from vimoe_dist.model import aux_loss, build_model
    from vimoe_dist.model.flops import last_expert_rows, model_flops
    from vimoe_dist.parallel.engine import unwrap
    from vimoe_dist.parallel.env import resolve_env
    from vimoe_dist.parallel.init import init_distributed
    from vimoe_dist.parallel.parallelize import parallelize
    from vimoe_dist.train.setup import build_criterion, build_engine, seed_everything

    cfg = load_config(spec["config"])
    env = resolve_env()
    init_distributed(cfg, env)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    seed_everything(cfg.run.seed)
    model = parallelize(build_model(cfg.model), cfg.parallel.ep_size)
    engine, _, _ = build_engine(model, cfg, env.world_size)
    build_seconds = time.perf_counter() - t0
    criterion = build_criterion(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision, torch.float32)
    b, m = cfg.train.global_batch_size, cfg.model
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(b, m.in_chans, m.img_size, m.img_size, device=device, generator=gen).to(dtype)
    labels = torch.randint(0, m.num_classes, (b,), device=device, generator=gen)
    soft = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    target = torch.nn.functional.one_hot(labels, m.num_classes).float() if soft else labels
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        logits = engine(images)
        loss = criterion(logits.float(), target) + aux_loss(unwrap(engine))
        engine.backward(loss)
        engine.step()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    step_s = statistics.median(seconds[spec["warmup"] :])
    rows = last_expert_rows(unwrap(engine))
    flops = model_flops(unwrap(engine), {i: sum(r) / b for i, r in rows.items()})
    result = {
        "device": _device_name(device), "batch": b, "img_size": m.img_size, "precision": cfg.parallel.precision,
        "zero_stage": cfg.parallel.zero_stage, "steps": spec["steps"], "build_seconds": build_seconds,
        "step_ms": step_s * 1e3, "images_per_sec": b / step_s, "loss": float(loss.detach()),
        "flops_per_image": flops.as_dict(), "achieved_tflops": flops.training * b / step_s / 1e12,
        "expert_rows": rows,
    }  # fmt: skip
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["total_bytes"] = torch.cuda.get_device_properties(device).total_memory
        try:
            peak = peak_flops(result["device"], cfg.parallel.precision, spec.get("peak_tflops"), "--peak-tflops")
            result["peak_tflops"] = peak / 1e12
            result["mfu"] = mfu(result["achieved_tflops"] * 1e12, peak)
        except Exception as e:  # an unknown GPU: the step still counts, MFU is left out and says why
            result["mfu_error"] = str(e)
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


PARTS = {"experts": bench_experts, "step": bench_step, "alltoall": bench_alltoall}  # bench_alltoall: parallel/


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vimoe_dist.doctor.gpu_worker")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = PARTS[args.part](json.loads(Path(args.spec).read_text()))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
