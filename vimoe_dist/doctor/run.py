"""The doctor's order of work, its printout and its JSON.

The two probes (torch, DeepSpeed) start first, as child processes, and run while the node checks do; the checks
that need the GPU count (/dev/shm, ports) or the model's size (disk) come after them. Every check is bounded, so
the whole run is too: at most the probes' deadline plus the sum of the checks' deadlines, in practice seconds.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vimoe_dist.config import Config, ConfigError, micro_batch_size
from vimoe_dist.doctor import inputs, node, software
from vimoe_dist.doctor.result import FAIL, OK, SKIP, STATUSES, WARN, Check, Subprocess, bounded
from vimoe_dist.errors import UserError

PROBE = "vimoe_dist.parallel.probe"
TORCH_PROBE_TIMEOUT_S = 180  # importing torch and creating a CUDA context on every GPU of a slow node
DEEPSPEED_PROBE_TIMEOUT_S = 180  # importing DeepSpeed, loading its ops (ninja checks a cached JIT build)
CHECK_TIMEOUT_S = 30
INPUT_TIMEOUT_S = 180  # a remote shard, a large pretrained file on a network file system

ORDER = (
    "python", "torch", "cuda", "nccl", "deepspeed", "deepspeed_ops", "gpus", "infiniband", "shm", "open_files",
    "disk", "metrics_ports", "model", "data_train", "data_val", "pretrained",
    "bench_experts", "bench_train_step", "bench_alltoall",
)  # fmt: skip


@dataclass
class DoctorOptions:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    gpu_bench: bool = False
    json_path: str | None = None
    peak_tflops: float | None = None
    batch: int | None = None


def run_doctor(cfg: Config | None, options: DoctorOptions, write=print) -> tuple[list[Check], dict]:
    """All checks (and the GPU bench when asked); returns the checks in ORDER and the bench's raw results."""
    torch_probe = Subprocess(["-m", PROBE, "torch"], TORCH_PROBE_TIMEOUT_S)
    ds_probe = Subprocess(["-m", PROBE, "deepspeed"], DEEPSPEED_PROBE_TIMEOUT_S)
    checks = {}
    try:
        # while the probes import torch and DeepSpeed: the checks that need neither's answer
        for name, fn in (("python", software.check_python), ("infiniband", node.check_infiniband),
                         ("open_files", node.check_open_files)):  # fmt: skip
            checks[name] = bounded(name, fn, CHECK_TIMEOUT_S)
        if cfg is not None:
            checks["model"] = bounded("model", lambda: inputs.check_model(cfg), INPUT_TIMEOUT_S)
        torch_facts, torch_why = torch_probe.result()
        if options.gpu_bench and not (torch_facts and torch_facts["cuda_available"]):
            why = _no_gpu_reason(torch_facts, torch_why)
            raise UserError(f"--gpu-bench needs a CUDA GPU and torch sees none here ({why})")
        precision = cfg.parallel.precision if cfg is not None else None
        checks["torch"] = software.check_torch(torch_facts, torch_why)
        checks["cuda"] = software.check_cuda(torch_facts)
        checks["nccl"] = software.check_nccl(torch_facts)
        checks["gpus"] = software.check_gpus(torch_facts, precision, options.peak_tflops)
        ds_facts, ds_why = ds_probe.result()
        checks["deepspeed"] = software.check_deepspeed(ds_facts, ds_why, torch_facts)
        checks["deepspeed_ops"] = software.check_deepspeed_ops(ds_facts)
    finally:
        torch_probe.kill()
        ds_probe.kill()

    local_ranks = max(1, len(torch_facts["devices"]) if torch_facts else 0)
    shm_need = _shm_need(cfg, local_ranks) if cfg is not None else None
    checks["shm"] = bounded("shm", lambda: node.check_shm(need=shm_need), CHECK_TIMEOUT_S)
    model_data = checks["model"].data if "model" in checks else {}
    out_dir = cfg.run.out_dir if cfg is not None else "."
    keep = cfg.train.keep_checkpoints if cfg is not None else 2
    checks["disk"] = bounded(
        "disk", lambda: node.check_disk(out_dir, model_data.get("checkpoint_bytes"), keep), CHECK_TIMEOUT_S
    )
    if cfg is None:
        checks["metrics_ports"] = Check("metrics_ports", SKIP, "no --config: the run's ports are unknown")
    else:
        m = cfg.metrics
        checks["metrics_ports"] = bounded(
            "metrics_ports",
            lambda: node.check_metrics_ports(m.port, m.addr, local_ranks, m.port_search),
            CHECK_TIMEOUT_S,
        )
        for key in ("data.train", "data.val"):
            name = key.replace(".", "_")
            checks[name] = bounded(name, lambda key=key: inputs.check_shard(cfg, key), INPUT_TIMEOUT_S)
        checks["pretrained"] = bounded("pretrained", lambda: inputs.check_pretrained(cfg), INPUT_TIMEOUT_S)

    bench: dict = {}
    if options.gpu_bench:
        from vimoe_dist.doctor.gpu_bench import run_gpu_bench

        bench_checks, bench = run_gpu_bench(
            options.config, options.overrides, len(torch_facts["devices"]), batch=options.batch,
            peak_tflops=options.peak_tflops, write=write,
        )  # fmt: skip
        checks.update({c.name: c for c in bench_checks})
    return [checks[name] for name in ORDER if name in checks], bench


def _no_gpu_reason(facts: dict | None, why: str) -> str:
    if facts is None:
        return f"torch did not import: {why}"
    if facts["nvidia_devices"]:
        return f"{len(facts['nvidia_devices'])} NVIDIA device file(s), but torch {facts['torch']} cannot use them"
    return f"torch {facts['torch']}, no NVIDIA device on this node"


def _shm_need(cfg: Config, local_ranks: int) -> tuple[int, int]:
    """The node's data loaders at the config's settings, assuming the whole job on this node (the largest per-rank
    batch it can have): float32 images of model.img_size."""
    m, t, d = cfg.model, cfg.train, cfg.data
    try:
        micro = micro_batch_size(cfg, local_ranks)
    except ConfigError:  # the job spans more nodes than this one: its batch split is checked at launch; bound it here
        micro = -(-t.global_batch_size // (local_ranks * t.grad_accum))
    return node.shm_need(4 * m.in_chans * m.img_size**2, micro, d.num_workers, d.prefetch, local_ranks)


def report(checks: list[Check], seconds: float, config: str | None, write=print) -> None:
    """The human-readable result: one line per check, its fix indented below a warn or fail, a summary line."""
    where = socket.gethostname() + (f", config {config}" if config else "")
    write(f"vimoe doctor on {where}")
    width = max(len(c.name) for c in checks)
    for c in checks:
        write(f"  {c.status:<4}  {c.name:<{width}}  {c.summary}")
        if c.status in (WARN, FAIL) and c.fix:
            write(f"  {'':<4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    write(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail, {counts[SKIP]} skipped in {seconds:.1f} s")


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def write_json(path: str, checks: list[Check], bench: dict, seconds: float, config: str | None) -> None:
    """`path` "-" is stdout."""
    payload = {
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "seconds": round(seconds, 2),
        "exit_code": exit_code(checks),
        "summary": {s: sum(c.status == s for c in checks) for s in STATUSES},
        "checks": [c.to_dict() for c in checks],
        "gpu_bench": bench or None,
    }
    text = json.dumps(payload, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
