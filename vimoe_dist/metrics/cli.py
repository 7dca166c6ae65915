"""`vimoe plot RUN_DIR`: draws the curves of a run (see `vimoe_dist.metrics.plot`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG curves of a run: loss, top-1, images/s, lr, expert load per layer")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from vimoe_dist.metrics.plot import plot_run

    for path, panels in plot_run(args.run_dir, args.out).items():
        print(f"{path}: {' | '.join(panels)}")
    return 0
