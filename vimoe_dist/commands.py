"""Core subcommands whose code lives elsewhere; each handler imports its heavy modules when it runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="write the digits shards and train the demo expert-parallel on 2 CPU ranks")
    p.add_argument("--out", default="runs/digits", help="run directory")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from vimoe_dist.demo import run_demo

    return run_demo(args.out)
