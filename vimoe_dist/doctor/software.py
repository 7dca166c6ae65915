"""Checks read from the probes' facts (probe.py): Python, torch, CUDA, NCCL, the GPUs, DeepSpeed and its ops.

Each function takes the facts a probe wrote (or None and the reason it gave none) and returns one `Check`; they do
no I/O themselves, so the tests can hand them the facts a GPU node reports.
"""

from __future__ import annotations

import sys

from vimoe_dist.doctor.result import FAIL, OK, SKIP, WARN, Check

MIN_PYTHON = (3, 10)  # pyproject's requires-python
BUILD_SHM_OP = (
    "python -c \"from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder')"
    '.load()"'
)


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", FAIL, f"Python {version}", fix="vimoe-dist needs Python >= 3.10")
    return Check("python", OK, f"Python {version} ({sys.executable})")


def check_torch(facts: dict | None, why: str) -> Check:
    if facts is None:
        return Check("torch", FAIL, f"importing torch failed: {why}", fix="reinstall torch in this environment")
    if facts["cuda_build"]:
        build = f"CUDA {facts['cuda_build']}"
    elif facts["hip_build"]:
        build = f"ROCm {facts['hip_build']}"
    else:
        build = "the CPU only"
    return Check("torch", OK, f"torch {facts['torch']} (built for {build})", data={"torch": facts["torch"]})


def check_cuda(facts: dict | None) -> Check:
    """CUDA as torch sees it, against the NVIDIA devices the node has: devices torch cannot use are a failure."""
    if facts is None:
        return Check("cuda", SKIP, "torch did not import")
    data = {k: facts[k] for k in ("cuda_build", "nvidia_driver", "nvidia_devices", "cuda_visible_devices")}
    has_hardware = bool(facts["nvidia_devices"]) or facts["nvidia_driver"] is not None
    if facts["cuda_available"]:
        driver = f"; driver: {facts['nvidia_driver']}" if facts["nvidia_driver"] else ""
        return Check("cuda", OK, f"CUDA {facts['cuda_build'] or facts['hip_build']} available{driver}", data=data)
    if has_hardware:
        if not facts["cuda_build"]:
            return Check(
                "cuda", FAIL, f"NVIDIA GPUs are present but torch {facts['torch']} is a CPU-only build",
                fix="install a CUDA build of torch (https://pytorch.org/get-started/locally/)",
                data=data,
            )  # fmt: skip
        if facts["cuda_visible_devices"] is not None and not facts["cuda_visible_devices"].strip(","):
            return Check("cuda", FAIL, "CUDA_VISIBLE_DEVICES is empty: no GPU visible", fix="unset it", data=data)
        return Check(
            "cuda", FAIL, f"NVIDIA GPUs are present but torch (CUDA {facts['cuda_build']}) cannot use them",
            fix="a driver older than torch's CUDA, or a container without --gpus: check nvidia-smi",
            data=data,
        )  # fmt: skip
    return Check("cuda", SKIP, f"no NVIDIA GPU on this node (torch built for CUDA {facts['cuda_build']})", data=data)


def check_nccl(facts: dict | None) -> Check:
    if facts is None or not facts["cuda_available"]:
        return Check("nccl", SKIP, "no GPU: collectives use gloo")
    if not facts["nccl_available"] or not facts["nccl"]:
        return Check(
            "nccl", FAIL, f"torch has no NCCL ({facts.get('nccl_error', 'not built with it')})",
            fix="install a torch build with NCCL (the CUDA wheels from download.pytorch.org carry it)",
        )  # fmt: skip
    return Check("nccl", OK, f"NCCL {facts['nccl']}", data={"nccl": facts["nccl"]})


def check_gpus(facts: dict | None, precision: str | None = None, peak_tflops: float | None = None) -> Check:
    """Visible GPUs, memory (total, free) and bf16; memory held by other processes, missing bf16, and a GPU whose
    peak FLOP/s the table lacks (no MFU without one, unless `peak_tflops` gives it) are flagged."""
    from vimoe_dist.metrics.flops import lookup_peak

    if facts is None or not facts["cuda_available"]:
        return Check(
            "gpus", WARN, "no GPU visible: a run here trains on the CPU with gloo",
            fix="on a GPU node: check nvidia-smi, CUDA_VISIBLE_DEVICES, and --gpus all for containers",
        )  # fmt: skip
    devices = facts["devices"]
    names = sorted({d["name"] for d in devices})
    gib = min(d["total_bytes"] for d in devices) / 2**30
    summary = f"{len(devices)} x {' / '.join(names)}, {gib:.0f} GiB each"
    data = {"devices": devices, "peaks": {n: (p.name if (p := lookup_peak(n)) else None) for n in names}}
    no_bf16 = [d["index"] for d in devices if not d["bf16"]]
    if no_bf16 and precision == "bf16":
        return Check(
            "gpus", FAIL, f"{summary}; GPU {no_bf16[0]} has no bf16 (compute capability < 8.0)",
            fix="set parallel.precision=fp16 (or fp32) for these GPUs", data=data,
        )  # fmt: skip
    busy = [d for d in devices if d["free_bytes"] < 0.9 * d["total_bytes"]]
    if busy:
        d = busy[0]
        used = (d["total_bytes"] - d["free_bytes"]) / 2**30
        return Check(
            "gpus", WARN, f"{summary}; GPU {d['index']} already has {used:.1f} GiB in use",
            fix="another process holds GPU memory: see nvidia-smi", data=data,
        )  # fmt: skip
    unknown = [n for n, p in data["peaks"].items() if p is None]
    if unknown and peak_tflops is None:
        return Check(
            "gpus", WARN, f"{summary}; no peak FLOP/s known for {unknown[0]!r}, so no MFU",
            fix="give the GPU's dense peak explicitly (vimoe doctor --peak-tflops)", data=data,
        )  # fmt: skip
    bf16 = "bf16" if not no_bf16 else f"bf16 on {len(devices) - len(no_bf16)} of {len(devices)}"
    return Check("gpus", OK, f"{summary}, {bf16}", data=data)


def check_deepspeed(facts: dict | None, why: str, torch_facts: dict | None) -> Check:
    if facts is None:
        return Check("deepspeed", FAIL, f"importing deepspeed failed: {why}", fix="pip install deepspeed")
    gpus = bool(torch_facts and torch_facts["cuda_available"])
    summary = f"DeepSpeed {facts['deepspeed']}, accelerator {facts['accelerator']} ({facts['comm_backend']})"
    data = {k: facts[k] for k in ("deepspeed", "accelerator", "comm_backend")}
    if gpus and facts["accelerator"] == "cpu":
        return Check(
            "deepspeed", FAIL, f"{summary} although torch sees GPUs",
            fix="unset DS_ACCELERATOR (or set it to cuda)", data=data,
        )  # fmt: skip
    return Check("deepspeed", OK, summary, data=data)


def check_deepspeed_ops(facts: dict | None) -> Check:
    """The ops a run loads load: prebuilt ones import, a cached JIT build loads, a missing one is a warning."""
    if facts is None:
        return Check("deepspeed_ops", SKIP, "deepspeed did not import")
    ops = facts["ops"]
    data = {"ops": ops}
    broken = [op for op in ops if op["status"] == "error"]
    if broken:
        op = broken[0]
        return Check(
            "deepspeed_ops", FAIL, f"{op['kind']} op {op['name']} does not load: {op['error']}",
            fix="rebuild DeepSpeed's ops against this torch (pip install --force-reinstall --no-cache-dir deepspeed)",
            data=data,
        )  # fmt: skip
    missing = [op for op in ops if op["status"] == "not_built"]
    if missing:
        return Check(
            "deepspeed_ops", WARN,
            f"{missing[0]['name']} is not built yet: the first run JIT-builds it (about a minute per node)",
            fix=f"build it once now: {BUILD_SHM_OP}", data=data,
        )  # fmt: skip
    incompatible = [op["name"] for op in ops if op["status"] == "incompatible"]
    loaded = [op["name"] for op in ops if op["status"] == "loaded"]
    summary = f"loaded: {', '.join(loaded)}" if loaded else "no op to load (this accelerator JIT-builds none)"
    if incompatible:
        summary += f"; {', '.join(incompatible)} cannot build here (DeepSpeed falls back to torch.distributed)"
    return Check("deepspeed_ops", OK, summary, data=data)
