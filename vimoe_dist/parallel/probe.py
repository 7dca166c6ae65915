"""What a fresh interpreter on this node sees of torch and DeepSpeed, written as JSON by a child process.

Run as `python -m vimoe_dist.parallel.probe torch|deepspeed --out FILE`; `result.Subprocess` starts it with a
deadline, because importing torch on a broken driver, creating CUDA contexts, or loading a DeepSpeed op (which runs
ninja, and compiles when the op's sources changed) can each take minutes or hang.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
from pathlib import Path

# the op DeepSpeed's communication backend builds when it starts (TorchBackend.__init__, `build_shm_op`): on the
# CPU accelerator a shared-memory all-reduce, JIT-compiled on first use; the CUDA accelerator has no such op
COMM_OP_BUILDER = "ShareMemCommBuilder"


def torch_facts() -> dict:
    """Versions, the NCCL torch carries, and every visible GPU (name, memory, compute capability, bf16)."""
    facts: dict = {"python": platform.python_version(), "nvidia_devices": sorted(glob.glob("/dev/nvidia[0-9]*"))}
    driver = Path("/proc/driver/nvidia/version")
    facts["nvidia_driver"] = driver.read_text().splitlines()[0].strip() if driver.exists() else None
    facts["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch

    facts.update(torch=torch.__version__, cuda_build=torch.version.cuda, hip_build=getattr(torch.version, "hip", None))
    facts["nccl_available"] = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    try:
        version = torch.cuda.nccl.version()
        facts["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception as e:  # a CPU-only build has no NCCL
        facts["nccl"], facts["nccl_error"] = None, f"{type(e).__name__}: {e}"[:200]
    facts["cuda_available"] = torch.cuda.is_available()
    devices = []
    if facts["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            capability = [props.major, props.minor]
            devices.append(
                {
                    "index": i,
                    "name": props.name,
                    "total_bytes": int(total),
                    "free_bytes": int(free),
                    "capability": capability,
                    # bf16 tensor cores: NVIDIA from Ampere (sm80) on; every ROCm GPU torch supports has bf16
                    "bf16": facts["hip_build"] is not None or capability >= [8, 0],
                    "multiprocessors": props.multi_processor_count,
                }
            )
    facts["devices"] = devices
    return facts


def deepspeed_facts() -> dict:
    """DeepSpeed's version and accelerator, and whether the ops a run loads do load.

    Ops: every op prebuilt into the installation (`DS_BUILD_OPS=1`, as in the Docker image) is loaded; the
    communication backend's JIT op is loaded when a build of it is cached, and reported `not_built` otherwise
    (building it takes about a minute; the first run on the node would pay that).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    accelerator = get_accelerator()
    facts: dict = {
        "deepspeed": deepspeed.__version__,
        "accelerator": accelerator._name,
        "comm_backend": accelerator.communication_backend_name(),
        "ops": [],
    }
    prebuilt = sorted(op for op, ok in installed_ops.items() if ok) if accelerator_name == accelerator._name else []
    for name in prebuilt:
        facts["ops"].append(_load(name, ALL_OPS.get(name), "prebuilt"))
    builder = accelerator.create_op_builder(COMM_OP_BUILDER)
    if builder is not None and builder.NAME not in prebuilt:
        compatible = deepspeed.ops.__compatible_ops__.get(builder.NAME, False)
        if not compatible:
            facts["ops"].append({"name": builder.NAME, "kind": "jit", "status": "incompatible"})
        elif not _jit_built(builder.NAME):
            facts["ops"].append({"name": builder.NAME, "kind": "jit", "status": "not_built"})
        else:
            facts["ops"].append(_load(builder.NAME, builder, "jit"))
    return facts


def jit_build_dir(name: str) -> Path:
    """Where torch's cpp_extension keeps (and looks for) the JIT build of `name`: TORCH_EXTENSIONS_DIR, else the
    default root plus a python/accelerator folder, as `torch.utils.cpp_extension._get_build_directory` computes it
    (that function also creates the folder, which a check must not do)."""
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accelerator = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")
    return Path(root) / name


def _jit_built(name: str) -> bool:
    return (jit_build_dir(name) / f"{name}.so").exists()


def _load(name: str, builder, kind: str) -> dict:
    entry = {"name": name, "kind": kind}
    if builder is None:
        return {**entry, "status": "error", "error": "DeepSpeed lists it as installed but has no builder for it"}
    try:
        builder.load()
    except Exception as e:  # a prebuilt op compiled against another torch, a missing compiler, a link error...
        return {**entry, "status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    return {**entry, "status": "loaded"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vimoe_dist.parallel.probe")
    parser.add_argument("what", choices=("torch", "deepspeed"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    facts = torch_facts() if args.what == "torch" else deepspeed_facts()
    Path(args.out).write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
