"""Which device a rank computes on (`run.device: auto | cuda | cpu`), decided once and never silently wrong.

`auto` is CUDA when it is usable and the CPU otherwise, except where the job was clearly meant for GPUs: a GPU
allocation or launcher whose CUDA does not work (a driver too old for torch's CUDA, a container started without its
GPUs, a CPU-only torch build) is a one-line error naming what asked for GPUs, not a CPU job that runs 100 times
slower without a word. What counts as asking for GPUs (`gpu_request`):

- `VIMOE_GPUS_PER_NODE`, which the sbatch script of `vimoe launch slurm --gpus-per-node G` exports;
- Slurm's GPU variables of an allocation (`SLURM_JOB_GPUS`, `SLURM_STEP_GPUS`, `SLURM_GPUS_ON_NODE`,
  `SLURM_GPUS_PER_NODE`, `SLURM_GPUS_PER_TASK`, `SLURM_GPUS`), unless they say 0;
- `CUDA_VISIBLE_DEVICES` naming devices, except under the deepspeed launcher, which writes it for every rank even
  on a CPU-only machine (its CPU accelerator keeps the variable's name), so there it says nothing;
- an NVIDIA driver on the machine (`/proc/driver/nvidia/gpus/*`, `/dev/nvidia0`): GPUs are there, CUDA is not.

A CPU-only machine has none of these, so `make demo`, CI and a laptop run on the CPU under `auto` as well as under
`cpu` (the demo config says `cpu`, so a workstation with GPUs runs the same CPU demo). `cuda` without usable CUDA is
always an error. The backend follows the device (parallel/init.py `resolve_backend`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch

from vimoe_dist.errors import UserError

DEVICES = ("auto", "cuda", "cpu")
GPUS_MARKER = "VIMOE_GPUS_PER_NODE"  # exported by the rendered sbatch script (launch/sbatch.py)
SLURM_GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")  # GPU indices: "0" is GPU 0
SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")  # "0": none
_NO_DEVICES = ("", "-1", "none", "nodevfiles", "void", "(null)", "n/a")
_DRIVER_FILES = ("/proc/driver/nvidia/gpus", "/dev/nvidia0")


def gpu_request(environ: Mapping[str, str] | None = None, driver_files: tuple[str, ...] = _DRIVER_FILES) -> str | None:
    """What in this process's surroundings asks for GPUs, as a short phrase for an error message; None on a machine
    that never meant to have any (see the module docstring)."""
    environ = os.environ if environ is None else environ
    for name in (GPUS_MARKER, *SLURM_GPU_COUNTS, *SLURM_GPU_LISTS):
        value = environ.get(name, "").strip()
        none = value.lower() in _NO_DEVICES or (name not in SLURM_GPU_LISTS and _is_zero_count(value))
        if not none:
            return f"{name}={value}"
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    deepspeed_launcher = "LOCAL_SIZE" in environ or "CROSS_RANK" in environ
    if visible.lower() not in _NO_DEVICES and not deepspeed_launcher:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for path in driver_files:
        p = Path(path)
        if p.exists() and not (p.is_dir() and not any(p.iterdir())):  # an empty gpus/ folder lists no GPU
            return f"an NVIDIA driver ({path})"
    return None


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (None when it can), in a few words."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    except Exception as e:  # a broken driver raises from some torch builds instead of answering False
        return f"CUDA fails to start ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return "torch.cuda.is_available() is False (no GPU visible, or a driver that does not match torch's CUDA)"


def resolve_device(
    requested: str,
    local_rank: int = 0,
    *,
    one_gpu_per_task: bool = False,
    environ: Mapping[str, str] | None = None,
    driver_files: tuple[str, ...] = _DRIVER_FILES,
) -> torch.device:
    """The device of the rank with `local_rank` on this machine for `run.device` = `requested`.

    Args:
        one_gpu_per_task: the launcher may have bound one GPU to each task (Slurm `--gpu-bind`, `--gpus-per-task`):
            a single visible device then serves any local rank.

    Raises:
        UserError: `cuda` without usable CUDA, `auto` under a GPU request without usable CUDA, or fewer visible GPUs
            than the local rank needs; one line naming `run.device` and the cause.
    """
    if requested not in DEVICES:
        raise UserError(f"run.device: {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda", _cuda_index(local_rank, one_gpu_per_task))
    if requested == "cuda":
        raise UserError(f"run.device: cuda, but CUDA is not usable here: {problem}; set run.device=cpu to run on CPUs")
    asked = gpu_request(environ, driver_files)
    if asked is not None:
        raise UserError(
            f"run.device: auto: {asked} asks for GPUs, but CUDA is not usable here: {problem}; fix the node or the "
            "container's GPU access, or set run.device=cpu to run on CPUs on purpose"
        )
    return torch.device("cpu")


def _cuda_index(local_rank: int, one_gpu_per_task: bool) -> int:
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1 and one_gpu_per_task:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise UserError(
        f"run.device: local rank {local_rank} needs GPU {local_rank}, but {count} CUDA device(s) are visible"
        f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; start at most {count} ranks per node"
    )


def _is_zero_count(value: str) -> bool:
    """`0`, `gpu:0`, `gpu:a100:0`: Slurm's way of saying no GPUs."""
    return value.rsplit(":", 1)[-1].strip() == "0"


def describe_device(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu (16 threads)`, for the start-up line."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def select_accelerator(requested: str, environ: MutableMapping[str, str] | None = None) -> None:
    """Hands `run.device` to DeepSpeed, which picks its accelerator once, when it is first imported (CUDA wherever
    torch sees a GPU): call it before anything imports DeepSpeed, so that a CPU run on a GPU machine keeps its model
    on the CPU. `auto` leaves DeepSpeed's own choice, which is the same as ours."""
    environ = os.environ if environ is None else environ
    if requested in ("cpu", "cuda"):
        environ["DS_ACCELERATOR"] = requested
