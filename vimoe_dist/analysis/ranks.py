"""Ranks for the analysis commands: one process by default; under torchrun or srun the process group is joined so
each rank runs its share of the validation data and the statistics are summed (`RoutingAccumulator.all_reduce`).

No expert parallelism here: every rank holds the whole single-device model, which is what lets the analysis read a
checkpoint written at any ep_size.
"""

from __future__ import annotations

from datetime import timedelta

from vimoe_dist.config import Config


def init_ranks(cfg: Config) -> tuple[int, int]:
    """(rank, world size); joins the default process group when the launcher started several ranks."""
    import torch
    import torch.distributed as dist

    from vimoe_dist.parallel.env import resolve_env

    env = resolve_env()
    if not env.is_distributed:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=cfg.parallel.timeout_s),
    )
    return env.rank, env.world_size
