"""Ranks for the analysis commands: one process by default; under torchrun or srun the process group is joined so
each rank runs its share of the validation data and the statistics are summed (`RoutingAccumulator.all_reduce`).

No expert parallelism here: every rank holds the whole single-device model, which is what lets the analysis read a
checkpoint written at any ep_size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vimoe_dist.config import Config

if TYPE_CHECKING:
    import torch


def init_ranks(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the default process group when the launcher started several ranks. The
    device is `run.device` resolved for this rank (parallel/device.py): the GPU where there is one under `auto`."""
    from vimoe_dist.parallel.device import resolve_device
    from vimoe_dist.parallel.env import resolve_env
    from vimoe_dist.parallel.init import join_process_group

    env = resolve_env()
    device = resolve_device(cfg.run.device, env.local_rank, one_gpu_per_task=env.source == "slurm")
    if not env.is_distributed:
        return 0, 1, device
    join_process_group(cfg, env, device)
    return env.rank, env.world_size, device
