"""Process-group setup, after the job resolved its own environment (env.py): the backend, the collective timeout,
CPU threads, then DeepSpeed's initialisation of torch.distributed (or torch's own, for the analysis commands, which
need no DeepSpeed).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from vimoe_dist.config import Config
from vimoe_dist.parallel.env import DistEnv, export_env


def init_distributed(cfg: Config, env: DistEnv) -> None:
    """Initialises the process group of the training job through DeepSpeed (which also needs its own comm layer).

    Call it only after the layout was checked against `env.world_size` (`vimoe_dist.config.check_layout`): the
    rendezvous waits up to `parallel.timeout_s` for ranks that a wrong layout would never start. The collective
    timeout comes from `parallel.timeout_s` too: a dead or hung rank ends the job within it instead of leaving the
    others waiting forever in an all-to-all (NCCL also needs async error handling for that).
    """
    import deepspeed

    backend = _prepare(cfg, env)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timeout, verbose=False, rank=env.rank, world_size=env.world_size
    )


def join_process_group(cfg: Config, env: DistEnv) -> None:
    """The default process group without DeepSpeed, for commands that only sum statistics over ranks (analysis)."""
    if dist.is_initialized():
        return
    backend = _prepare(cfg, env)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
    )


def resolve_backend(name: str) -> str:
    """`parallel.backend`: `auto` is NCCL where there is a GPU and gloo elsewhere."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def _prepare(cfg: Config, env: DistEnv) -> str:
    """What both initialisations need first; returns the backend."""
    export_env(env)
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # CPU ranks of one node share its cores; oversubscribed threads slow every rank down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))
    backend = resolve_backend(cfg.parallel.backend)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(env.local_rank)
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
