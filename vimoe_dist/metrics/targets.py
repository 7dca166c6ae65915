"""Prometheus scrape targets of a job, one per rank, as a file service discovery (`file_sd_configs`) file.

Prometheus's file_sd (https://prometheus.io/docs/prometheus/latest/configuration/configuration/#file_sd_config)
picks up a JSON file in a watched directory and forgets the targets when the file empties or goes. Two sources:

1. **What the ranks bound** (`RUN_DIR/prometheus_targets.json`, the one to use): every rank calls
   `Metrics.publish_targets()` once, after `build_metrics` and once the process group exists; rank 0 gathers every
   rank's `host:port` (`gather_object`, bounded by the process group's timeout) and writes the file atomically,
   one target group per node. `Metrics.close()` empties it, so Prometheus stops scraping a finished job. Only this
   file knows a rank that a taken port moved to the next free one (`metrics.port_search`). The Slurm job links it
   into Prometheus's file_sd directory. The host of a target is `metrics.addr`, or the node's host name when the
   ranks bind every interface (`0.0.0.0`, `::`).
2. **What a Slurm allocation implies** (`vimoe metrics targets --slurm --port N`, also
   `python -m vimoe_dist.metrics.targets --port N`): every allocated node crossed with its local ranks at
   `metrics.port + LOCAL_RANK`, known before any rank starts; right as long as every port was free. The nodes come
   from `SLURM_JOB_NODELIST` and the tasks per node from `SLURM_TASKS_PER_NODE`, expanded in pure Python.

`vimoe metrics targets RUN_DIR` prints a run's file, or copies it with `--out` (e.g. into a file_sd directory that
cannot follow links). Ranks must bind an address Prometheus can reach: `metrics.addr=0.0.0.0` (or the node's
cluster address) on a trusted network. See `vimoe_dist/launch/monitoring/prometheus.yml`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from vimoe_dist.atomic import write_atomic
from vimoe_dist.errors import UserError
from vimoe_dist.launch.hostlist import expand_hostlist, expand_tasks_per_node
from vimoe_dist.metrics.server import is_loopback

log = logging.getLogger(__name__)

FILENAME = "prometheus_targets.json"  # a contract with the launchers (linked into Prometheus's file_sd directory)
ANY_ADDRESS = ("0.0.0.0", "::", "")


def publish_targets(endpoint: tuple[str, int] | None, rank: int, run_dir: str | Path | None) -> Path | None:
    """Collective over the default process group (none needed in a single process): rank 0 writes every rank's
    endpoint to `run_dir/prometheus_targets.json` and returns the path; other ranks return None.

    Args:
        endpoint: this rank's (address bound, port bound), None when `metrics.port` is 0 (then on every rank, so no
            rank enters the collective).
        rank: global rank.
        run_dir: the run directory (rank 0's; other ranks may pass None).
    """
    if endpoint is None:
        return None
    addr, port = endpoint
    node = socket.gethostname()
    mine = {"rank": rank, "target": f"{_bracket(node if addr.strip() in ANY_ADDRESS else addr)}:{port}", "node": node}
    dist = sys.modules.get("torch.distributed")  # imported by whoever made a process group; never imported here
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        entries = [e for e in gathered or () if isinstance(e, Mapping)]
    else:
        entries = [mine]
    if rank != 0:
        return None
    if run_dir is None:
        raise ValueError("publish_targets: rank 0 needs the run directory")
    nodes = sorted({e["node"] for e in entries})
    if is_loopback(addr) and len(nodes) > 1:
        log.warning(
            "metrics.addr %s: the ranks of %d nodes serve on loopback, which a Prometheus on another host cannot "
            "reach; set metrics.addr=0.0.0.0 (or the nodes' cluster address) on a trusted network", addr, len(nodes),
        )  # fmt: skip
    path = Path(run_dir) / FILENAME
    try:
        write_targets(target_groups(entries, os.environ.get("SLURM_JOB_ID")), path)
    except OSError as e:  # tracking never stops training
        log.warning("metrics: cannot write %s (%s); Prometheus will not discover this job", path, e.strerror or e)
        return None
    log.info("metrics: %d rank endpoints in %s", len(entries), path)
    return path


def target_groups(entries: list[Mapping], slurm_job_id: str | None = None) -> list[dict]:
    """One file_sd target group per node, its targets in rank order, labelled with the node (and the Slurm job
    id when known); the ranks' own `job` and `rank` labels are kept by `honor_labels: true`."""
    groups: dict[str, list[Mapping]] = {}
    for entry in sorted(entries, key=lambda e: e["rank"]):
        groups.setdefault(entry["node"], []).append(entry)
    out = []
    for node, members in groups.items():
        labels = {"node": node, **({"slurm_job_id": slurm_job_id} if slurm_job_id else {})}
        out.append({"targets": [e["target"] for e in members], "labels": labels})
    return out


def clear_targets(path: Path) -> None:
    """Empties a targets file (`[]`): Prometheus drops the job's targets instead of scraping dead endpoints."""
    try:
        write_targets([], path)
    except OSError as e:
        log.warning("metrics: cannot empty %s (%s)", path, e.strerror or e)


def read_targets(path: Path) -> list[dict]:
    """A targets file, checked to be what file_sd reads: a list of {targets: [host:port...], labels: {...}}."""
    try:
        groups = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (no rank has published its endpoint: metrics.port 0?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable targets file ({e})") from None
    ok = isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("targets"), list) and all(isinstance(t, str) for t in g["targets"])
        for g in groups
    )
    if not ok:
        raise UserError(f"{path}: not a Prometheus file_sd targets list")
    return groups


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
    write_atomic(out, json.dumps(groups, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m vimoe_dist.metrics.targets --port N [--out FILE]`: the same as `vimoe metrics targets --slurm`."""
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
