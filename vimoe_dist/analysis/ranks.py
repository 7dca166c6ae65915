"""Ranks for the analysis commands: one process by default; under torchrun or srun the process group is joined so
each rank runs its share of the validation data and the statistics are summed (`RoutingAccumulator.all_reduce`).

No expert parallelism here: every rank holds the whole single-device model, which is what lets the analysis read a
checkpoint written at any ep_size.
"""

from __future__ import annotations

from vimoe_dist.config import Config


def init_ranks(cfg: Config) -> tuple[int, int]:
    """(rank, world size); joins the default process group when the launcher started several ranks."""
    from vimoe_dist.parallel.env import resolve_env
    from vimoe_dist.parallel.init import join_process_group

    env = resolve_env()
    if not env.is_distributed:
        return 0, 1
    join_process_group(cfg, env)
    return env.rank, env.world_size
