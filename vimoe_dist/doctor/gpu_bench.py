"""`vimoe doctor --gpu-bench`: what this node's GPUs do with a ViMoE, measured in child processes with deadlines.

1. the expert bank's grouped GEMM against its per-expert loop (bf16 outputs and gradients must agree; times);
2. bf16 training steps of the run's model (`--config`, else ViMoE-S/14 at 224 px from configs/vimoe_s14_imagenet.yaml)
   with random weights and images on one GPU, at the config's per-GPU batch: images/s, MFU, peak memory;
3. `all_to_all_single` bandwidth between the visible GPUs over NCCL (one process per GPU).

Each part becomes a check (ok / warn / fail) and a table; the raw numbers go to the doctor's JSON. The device and
backend are arguments so that the tests run these very functions on the CPU with gloo; the CLI passes cuda and nccl
and refuses to start without a GPU.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from vimoe_dist.config import Config, load_config, micro_batch_size, save_config
from vimoe_dist.doctor.result import FAIL, OK, SKIP, WARN, Check, Subprocess
from vimoe_dist.errors import UserError
from vimoe_dist.net import free_port

DEFAULT_CONFIG = "vimoe_s14_imagenet.yaml"
WORKER = "vimoe_dist.doctor.gpu_worker"
EXPERTS_TIMEOUT_S, STEP_TIMEOUT_S, ALLTOALL_TIMEOUT_S = 240, 480, 240
ALLTOALL_SIZES = (2**20, 2**24, 2**26, 2**28)  # bytes per rank: 1, 16, 64, 256 MiB
GIB = 2**30


def shipped_config(name: str = DEFAULT_CONFIG) -> Path:
    """A config shipped with the package (vimoe_dist/configs/, also inside an installed wheel)."""
    from vimoe_dist.resources import find_config

    return find_config(name)


def bench_config(config: str | None, overrides: list[str], batch: int | None, out_dir: str) -> Config:
    """The run's config made into a one-GPU bf16 benchmark: random weights, no expert parallelism, the per-GPU
    batch of the run (global batch / (ep_size x grad_accum), i.e. one expert-parallel group of GPUs) unless given."""
    cfg = load_config(config or shipped_config(), overrides)
    group = cfg.model.moe.group_size
    per_gpu = micro_batch_size(cfg, cfg.parallel.ep_size)
    b = batch or max(group, per_gpu - per_gpu % group)
    if b % group:
        raise UserError(f"--batch: {b} is not a multiple of model.moe.group_size={group}")
    bench = [
        "parallel.ep_size=1", "parallel.precision=bf16", "model.pretrained=null", f"train.global_batch_size={b}",
        "train.grad_accum=1", "metrics.port=0", f"run.out_dir={out_dir}",
    ]  # fmt: skip
    return load_config(config or shipped_config(), [*overrides, *bench])


def run_gpu_bench(
    config: str | None,
    overrides: list[str],
    num_devices: int,
    batch: int | None = None,
    peak_tflops: float | None = None,
    device: str = "cuda",
    backend: str = "nccl",
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 20,
    sizes: tuple[int, ...] = ALLTOALL_SIZES,
    write: Callable[[str], None] = print,
) -> tuple[list[Check], dict]:
    """Runs the three parts one after the other; returns their checks and the raw results."""
    import torch

    from vimoe_dist.model import build_model
    from vimoe_dist.model.flops import find_moe, nominal_expert_rows

    payload: dict = {}
    with tempfile.TemporaryDirectory(prefix="vimoe-doctor-bench-") as tmp:
        cfg = bench_config(config, overrides, batch, str(Path(tmp) / "run"))
        config_path = Path(tmp) / "config.yaml"
        save_config(cfg, config_path)
        with torch.device("meta"):
            model = build_model(cfg.model)
        rows_per_image = nominal_expert_rows(model)
        b = cfg.train.global_batch_size
        payload["config"] = {"file": config or str(shipped_config()), "backbone": cfg.model.backbone, "batch": b}

        checks = []
        if rows_per_image:
            block = min(rows_per_image)
            moe = find_moe(model.blocks[block].mlp, block)
            spec = {
                "device": device, "num_experts": moe.num_experts, "dim": moe.experts.dim,
                "hidden": moe.experts.hidden_dim, "rows": int(rows_per_image[block] * b), "rounds": rounds,
                "warmup": warmup,
            }  # fmt: skip
            checks.append(_experts_check(*_run(tmp, "experts", spec, EXPERTS_TIMEOUT_S), payload, write))
        else:
            checks.append(Check("bench_experts", SKIP, "the model has no MoE layer"))

        spec = {"config": str(config_path), "steps": steps, "warmup": warmup, "peak_tflops": peak_tflops}
        single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1"))}  # fmt: skip
        checks.append(_step_check(*_run(tmp, "step", spec, STEP_TIMEOUT_S, single), cfg, payload, write))

        if num_devices < 2:
            checks.append(Check("bench_alltoall", SKIP, f"{num_devices} device visible: no all-to-all to measure"))
        else:
            spec = {"backend": backend, "sizes_bytes": list(sizes), "warmup": 5, "iters": 20,
                    "timeout_s": ALLTOALL_TIMEOUT_S / 2}  # fmt: skip
            checks.append(_alltoall_check(*_run_ranks(tmp, spec, num_devices), payload, write))
    return checks, payload


def _run(tmp: str, part: str, spec: dict, timeout_s: float, env: dict | None = None) -> tuple[dict | None, str]:
    spec_file = Path(tmp) / f"{part}.json"
    spec_file.write_text(json.dumps(spec))
    return Subprocess(["-m", WORKER, part, "--spec", str(spec_file)], timeout_s, env).result()


def _run_ranks(tmp: str, spec: dict, world: int) -> tuple[dict | None, str]:
    spec_file = Path(tmp) / "alltoall.json"
    spec_file.write_text(json.dumps(spec))
    port = str(free_port("127.0.0.1"))
    ranks = [
        Subprocess(["-m", WORKER, "alltoall", "--spec", str(spec_file)], ALLTOALL_TIMEOUT_S,
                   {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for r in range(world)
    ]  # fmt: skip
    results = []
    for r, proc in enumerate(ranks):
        payload, why = proc.result()
        if payload is None:
            for other in ranks[r + 1 :]:  # the others would wait for this rank until their collective timeout
                other.kill()
            return None, f"rank {r}: {why}"
        results.append(payload)
    return results[0], ""


def _experts_check(result: dict | None, why: str, payload: dict, write) -> Check:
    payload["experts"] = result
    if result is None:
        return Check("bench_experts", FAIL, f"the expert bank did not run: {why}", fix="see the message")
    if "skipped" in result:
        return Check("bench_experts", SKIP, result["skipped"], data=result)
    _table(write, "expert bank, forward + backward, bf16", [
        {"path": "per-expert loop", "ms": result["loop_ms"], "TFLOP/s": result["loop_tflops"]},
        {"path": "grouped GEMM", "ms": result["grouped_ms"], "TFLOP/s": result["grouped_tflops"]},
    ])  # fmt: skip
    worst = max(result["rel_errors"], key=result["rel_errors"].get)
    summary = (f"{result['experts']} experts x {result['rows']} rows ({result['dim']}->{result['hidden']}): grouped "
               f"GEMM {result['grouped_ms']:.2f} ms vs loop {result['loop_ms']:.2f} ms ({result['speedup']:.2f}x); "
               f"largest relative difference {result['rel_errors'][worst]:.1e} ({worst})")  # fmt: skip
    if not result["match"]:
        return Check(
            "bench_experts",
            FAIL,
            f"the two paths disagree: {summary}",
            fix="force the loop (GroupedExperts.grouped_mm = False) and report the torch version",
            data=result,
        )
    if result["speedup"] < 1.0:
        return Check("bench_experts", WARN, summary, fix="the bank uses grouped GEMM on this GPU although it is slower",
                     data=result)  # fmt: skip
    return Check("bench_experts", OK, summary, data=result)


def _step_check(result: dict | None, why: str, cfg: Config, payload: dict, write) -> Check:
    payload["step"] = result
    if result is None:
        fix = "a smaller --batch" if "out of memory" in why.lower() else "see the message"
        return Check("bench_train_step", FAIL, f"the training step did not run: {why}", fix=fix)
    row = {"model": cfg.model.backbone, "batch": result["batch"], "px": result["img_size"],
           "img/s": result["images_per_sec"], "ms/step": result["step_ms"],
           "GFLOP/img": result["flops_per_image"]["training"] / 1e9, "TFLOP/s": result["achieved_tflops"],
           "MFU": result.get("mfu"), "peak GiB": result.get("peak_allocated_bytes", float("nan")) / GIB}  # fmt: skip
    _table(write, "training step (model FLOPs: 3 x forward at the step's real expert rows)", [row])
    memory = ""
    if "peak_allocated_bytes" in result:
        memory = f", peak memory {result['peak_allocated_bytes'] / GIB:.1f} of {result['total_bytes'] / GIB:.0f} GiB"
    summary = (f"{cfg.model.backbone} at {result['img_size']} px, batch {result['batch']}, bf16: "
               f"{result['images_per_sec']:.0f} images/s, {result['achieved_tflops']:.1f} TFLOP/s{memory}")  # fmt: skip
    if "mfu" in result:
        return Check("bench_train_step", OK, f"{summary}, MFU {100 * result['mfu']:.1f}% of "
                     f"{result['peak_tflops']:.0f} TFLOP/s", data=result)  # fmt: skip
    if "mfu_error" in result:
        return Check("bench_train_step", WARN, f"{summary}; no MFU: {result['mfu_error']}",
                     fix="pass the GPU's dense bf16 peak with --peak-tflops", data=result)  # fmt: skip
    return Check("bench_train_step", OK, summary, data=result)


def _alltoall_check(result: dict | None, why: str, payload: dict, write) -> Check:
    payload["alltoall"] = result
    if result is None:
        return Check("bench_alltoall", FAIL, f"all-to-all did not complete: {why}",
                     fix="NCCL between the GPUs of this node is broken: rerun with NCCL_DEBUG=INFO")  # fmt: skip
    rows = [{"MiB": r["bytes"] / 2**20, "ms": r["ms"], "algbw GB/s": r["algbw_gbps"], "busbw GB/s": r["busbw_gbps"],
             "correct": r["correct"]} for r in result["sizes"]]  # fmt: skip
    _table(write, f"all-to-all, {result['world']} ranks, {result['backend']}", rows)
    largest = result["sizes"][-1]
    summary = (f"{result['world']} x {result['device']}: {largest['busbw_gbps']:.1f} GB/s bus bandwidth at "
               f"{largest['bytes'] / 2**20:.0f} MiB per rank")  # fmt: skip
    if not all(r["correct"] for r in result["sizes"]):
        return Check("bench_alltoall", FAIL, f"{summary}, but the data arrived wrong",
                     fix="a broken NCCL transport: rerun with NCCL_DEBUG=INFO", data=result)  # fmt: skip
    return Check("bench_alltoall", OK, summary, data=result)


def _table(write, title: str, rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    write("")
    write(title)
    write("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        write("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None or v != v:  # absent, or NaN
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
