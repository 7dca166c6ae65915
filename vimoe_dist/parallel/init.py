"""Process-group setup: the job resolves its own environment, then DeepSpeed initialises torch.distributed."""

from __future__ import annotations

import datetime
import logging
import os

import torch

from vimoe_dist.config import Config
from vimoe_dist.parallel.env import DistEnv, export_env, resolve_env

log = logging.getLogger(__name__)


def init_distributed(cfg: Config) -> DistEnv:
    """Resolves rank/world/master from Slurm or launcher variables and initialises the process group.

    The collective timeout comes from `parallel.timeout_s`: a dead or hung rank ends the job within it instead of
    leaving the others waiting forever in an all-to-all (NCCL also needs async error handling for that).
    """
    import deepspeed

    env = resolve_env()
    export_env(env)
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # CPU ranks of one node share its cores; oversubscribed threads slow every rank down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=timeout,
        verbose=False,
        rank=env.rank,
        world_size=env.world_size,
    )
    return env


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
