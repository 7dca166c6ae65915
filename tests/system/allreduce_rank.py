"""A tiny rank for exercising launchers and Slurm without the trainer: it resolves its place with
`vimoe_dist.parallel.env.resolve_env`, joins a gloo group, all-reduces its rank every step and counts steps in a
"checkpoint" file. On SIGUSR1 or SIGTERM it finishes the step, saves the count on rank 0 after a barrier and exits
75, the trainer's contract, so the sbatch template's requeue path can be tested in seconds.

    python tests/system/allreduce_rank.py OUT_DIR STEPS SECONDS_PER_STEP
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path


def main() -> int:
    out_dir, steps, step_seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    import torch
    import torch.distributed as dist

    from vimoe_dist.parallel.env import export_env, resolve_env

    env = resolve_env()
    export_env(env)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    ckpt = out_dir / "step.txt"
    start = int(ckpt.read_text()) if ckpt.exists() else 0
    step = start
    while step < steps:
        total = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(total)
        assert total.item() == env.world_size * (env.world_size + 1) / 2, total
        time.sleep(step_seconds)
        step += 1
        if env.rank == 0:
            (out_dir / "progress.txt").write_text(str(step))
        # every rank must agree to stop at the same step: all-reduce the "signal seen" flag
        flag = torch.tensor([1.0 if stop["signal"] else 0.0])
        dist.all_reduce(flag)
        if flag.item() > 0:
            break
    dist.barrier()
    record = {
        "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank, "node_rank": env.node_rank,
        "num_nodes": env.num_nodes, "master": f"{env.master_addr}:{env.master_port}", "source": env.source,
        "host": socket.gethostname(), "start": start, "end": step, "signal": stop["signal"],
        "restart": os.environ.get("SLURM_RESTART_COUNT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }  # fmt: skip
    with open(out_dir / "ranks.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if env.rank == 0:
        ckpt.write_text(str(step))
    dist.barrier()
    dist.destroy_process_group()
    return 75 if step < steps else 0


if __name__ == "__main__":
    sys.exit(main())
