"""Process-group setup, after the job resolved its own environment (env.py) and device (device.py): the backend that
goes with the device, the collective timeout, CPU threads, then DeepSpeed's initialisation of torch.distributed (or
torch's own, for the analysis commands, which need no DeepSpeed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from vimoe_dist.config import Config, ConfigError
from vimoe_dist.errors import UserError
from vimoe_dist.parallel.device import resolve_device
from vimoe_dist.parallel.env import DistEnv, export_env


def init_distributed(cfg: Config, env: DistEnv, device: torch.device | None = None) -> torch.device:
    """Initialises the process group of the training job through DeepSpeed (which also needs its own comm layer).

    Call it only after the layout was checked against `env.world_size` (`vimoe_dist.config.check_layout`): the
    rendezvous waits up to `parallel.timeout_s` for ranks that a wrong layout would never start. The collective
    timeout comes from `parallel.timeout_s` too: a dead or hung rank ends the job within it instead of leaving the
    others waiting forever in an all-to-all (NCCL also needs async error handling for that).

    `device` is the rank's (`resolve_device` of `run.device` when None); DeepSpeed's accelerator is made to agree
    with it, so a CPU run on a GPU machine keeps its model on the CPU. Returns the device.
    """
    device = _device(cfg, env, device)
    os.environ["DS_ACCELERATOR"] = device.type  # read once, when deepspeed is first imported
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device.type:
        raise UserError(
            f"run.device: the ranks run on the {device.type}, but DeepSpeed was imported earlier in this process and "
            f"chose {get_accelerator().device_name()}; set DS_ACCELERATOR={device.type} (or call "
            "vimoe_dist.parallel.device.select_accelerator before importing DeepSpeed)"
        )
    backend = _prepare(cfg, env, device)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    with _rendezvous(cfg, env):
        deepspeed.init_distributed(
            dist_backend=backend, timeout=timeout, verbose=False, rank=env.rank, world_size=env.world_size
        )
    return device


def join_process_group(cfg: Config, env: DistEnv, device: torch.device | None = None) -> torch.device:
    """The default process group without DeepSpeed, for commands that only sum statistics over ranks (analysis).
    Returns the rank's device (`resolve_device` of `run.device` when `device` is None)."""
    device = _device(cfg, env, device)
    if dist.is_initialized():
        return device
    backend = _prepare(cfg, env, device)
    with _rendezvous(cfg, env):
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
        )
    return device


@contextlib.contextmanager
def _rendezvous(cfg: Config, env: DistEnv) -> Iterator[None]:
    """A rendezvous that fails (an unreachable or unresolvable master, a rank that never comes, all bounded by
    `parallel.timeout_s`) is one line naming the master and what to check, not torch's traceback."""
    try:
        yield
    except dist.DistError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"parallel: rank {env.rank} of {env.world_size} could not join the job at the master "
            f"{env.master_addr}:{env.master_port} within parallel.timeout_s={cfg.parallel.timeout_s:g} s ({reason}); "
            "check that every rank was started, MASTER_ADDR/MASTER_PORT (or the launcher's), and that the port is "
            "reachable from this node"
        ) from None


def resolve_backend(name: str, device: torch.device) -> str:
    """`parallel.backend` for ranks computing on `device`: `auto` is NCCL on CUDA and gloo on the CPU; a backend
    that cannot move the device's tensors (NCCL on the CPU, gloo's missing CUDA all-to-all) is a ConfigError."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(f"parallel.backend: nccl needs CUDA, but the ranks run on the {device.type} (run.device)")
    if name == "gloo" and device.type == "cuda":
        raise ConfigError("parallel.backend: gloo has no all-to-all for CUDA tensors; use nccl or auto on GPUs")
    return name


def _device(cfg: Config, env: DistEnv, device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    return resolve_device(cfg.run.device, env.local_rank, one_gpu_per_task=env.source == "slurm")


def _prepare(cfg: Config, env: DistEnv, device: torch.device) -> str:
    """What both initialisations need first; returns the backend."""
    backend = resolve_backend(cfg.parallel.backend, device)
    export_env(env)
    if "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        # CPU ranks of one node share its cores; oversubscribed threads slow every rank down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    set_default_group_timeout(datetime.timedelta(seconds=cfg.parallel.timeout_s))
    return backend


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Makes `timeout` the default of every process group created later, not only of the world group.

    DeepSpeed creates its expert-parallel and expert-data-parallel groups with `dist.new_group(ranks)`, which takes
    torch's module default (30 min for gloo, 10 min for NCCL) instead of the world group's timeout: a rank that hangs
    inside the all-to-all would keep the others waiting that long whatever `parallel.timeout_s` says.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
