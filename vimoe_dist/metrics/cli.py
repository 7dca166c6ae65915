"""`vimoe plot RUN_DIR` (the curves of a run, `vimoe_dist.metrics.plot`) and `vimoe metrics targets` (the
Prometheus targets of a job, `vimoe_dist.metrics.targets`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vimoe_dist.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG curves of a run: loss, top-1, images/s, lr, expert load per layer")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    p.set_defaults(func=_plot)

    metrics = sub.add_parser("metrics", help="metrics tools: Prometheus targets of a job")
    tools = metrics.add_subparsers(dest="tool", metavar="TOOL", required=True)
    t = tools.add_parser(
        "targets",
        help="Prometheus file_sd targets: what a run's ranks bound, or what a Slurm allocation implies",
        description="Prints (or writes with --out) a Prometheus file_sd targets file. With RUN_DIR: the endpoints "
        "the ranks of that run actually bound (RUN_DIR/prometheus_targets.json, written by rank 0). With --slurm: "
        "every node of the Slurm allocation crossed with its local ranks at --port + local rank, before any rank "
        "starts (right as long as every port is free).",
    )
    t.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory")
    t.add_argument("--slurm", action="store_true", help="from SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE instead")
    t.add_argument("--port", type=int, metavar="N", help="with --slurm: the job's metrics.port")
    t.add_argument("--out", type=Path, metavar="FILE", help="write FILE atomically instead of printing")
    t.set_defaults(func=_targets)


def _plot(args: argparse.Namespace) -> int:
    from vimoe_dist.metrics.plot import plot_run

    for path, panels in plot_run(args.run_dir, args.out).items():
        print(f"{path}: {' | '.join(panels)}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from vimoe_dist.metrics.targets import FILENAME, read_targets, slurm_targets, write_targets

    if args.slurm == (args.run_dir is not None):
        raise UserError("give either RUN_DIR or --slurm --port N")
    if args.slurm:
        if args.port is None:
            raise UserError("--slurm needs --port N (the job's metrics.port)")
        groups = slurm_targets(os.environ, args.port)
    else:
        if args.port is not None:
            raise UserError("--port goes with --slurm; a run directory's file holds the ports the ranks bound")
        groups = read_targets(Path(args.run_dir) / FILENAME)
    if args.out is None:
        print(json.dumps(groups, indent=2))
        return 0
    try:
        write_targets(groups, args.out)
    except OSError as e:
        raise UserError(f"--out: cannot write {args.out} ({e.strerror or e})") from None
    print(f"wrote {args.out}: {sum(len(g['targets']) for g in groups)} targets")
    return 0
