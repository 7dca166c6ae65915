"""Prometheus scrape targets of a Slurm job, one per rank, as a `file_sd_configs` file.

Rank r on a node serves on `metrics.port + LOCAL_RANK`, so the targets of a job are every allocated node crossed
with its local ranks. Prometheus's file service discovery
(https://prometheus.io/docs/prometheus/latest/configuration/configuration/#file_sd_config) picks up a JSON file
dropped into a watched directory, and forgets the job when the file is removed. The sbatch script runs, before
`srun`:

    python -m vimoe_dist.metrics.targets --port 9400 --out /shared/prometheus/vimoe/$SLURM_JOB_ID.json
    trap 'rm -f /shared/prometheus/vimoe/$SLURM_JOB_ID.json' EXIT

The nodes come from `SLURM_JOB_NODELIST` and the tasks per node from `SLURM_TASKS_PER_NODE` (both expanded in
pure Python, as the ranks do). Ranks must bind an address Prometheus can reach: `metrics.addr=0.0.0.0` (or the
node's cluster address) on a trusted network. See `launcher/monitoring/prometheus.yml`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from vimoe_dist.errors import UserError
from vimoe_dist.launch.hostlist import expand_hostlist, expand_tasks_per_node


def slurm_targets(environ: Mapping[str, str], port: int) -> list[dict]:
    """One file_sd target group per node: `host:port+local_rank` for each of its tasks, labelled with the job id
    and node (the ranks' own `job` and `rank` labels are kept by `honor_labels: true`)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    tasks = environ.get("SLURM_TASKS_PER_NODE") or environ.get("SLURM_STEP_TASKS_PER_NODE")
    if not nodelist or not tasks:
        raise UserError("targets: SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE are not set (run inside a Slurm job)")
    hosts = expand_hostlist(nodelist)
    counts = expand_tasks_per_node(tasks)
    if len(counts) != len(hosts):
        raise UserError(f"targets: {len(hosts)} nodes in {nodelist!r} but {len(counts)} task counts in {tasks!r}")
    if not (port > 0 and port + max(counts) - 1 <= 65535):
        raise UserError(f"targets: --port {port} + local ranks is not a TCP port range")
    job_id = environ.get("SLURM_JOB_ID", "")
    return [
        {
            "targets": [f"{host}:{port + local_rank}" for local_rank in range(count)],
            "labels": {"slurm_job_id": job_id, "node": host},
        }
        for host, count in zip(hosts, counts)
    ]


def write_targets(groups: list[dict], out: Path) -> None:
    """Writes atomically: Prometheus watches the directory and must never read half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vimoe_dist.metrics.targets", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="metrics.port of the job")
    parser.add_argument("--out", type=Path, default=None, help="file to write (default: print to stdout)")
    args = parser.parse_args(argv)
    try:
        groups = slurm_targets(os.environ, args.port)
    except UserError as e:
        print(f"vimoe targets: error: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        print(json.dumps(groups, indent=2))
    else:
        write_targets(groups, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
