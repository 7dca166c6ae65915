"""The `vimoe` command. Each area registers its own subcommands; this file only collects them and turns a
`UserError` into one line on stderr and exit code 2 (no traceback for a user's mistake)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vimoe_dist import __version__
from vimoe_dist.caches import ensure_writable_caches
from vimoe_dist.errors import UserError

# modules with `register(subparsers)`; importing them must stay cheap (no torch at import time)
COMMAND_MODULES = (
    "vimoe_dist.config.cli",
    "vimoe_dist.train.cli",
    "vimoe_dist.data.cli",
    "vimoe_dist.launch.cli",
    "vimoe_dist.metrics.cli",
    "vimoe_dist.analysis.cli",
    "vimoe_dist.bench.cli",
    "vimoe_dist.doctor.cli",
    "vimoe_dist.parallel.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vimoe", description="Distributed expert-parallel Vision MoE training.")
    parser.add_argument("--version", action="version", version=f"vimoe-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config FILE` and trailing `key=value` overrides, the same for every command that takes a config."""
    parser.add_argument("--config", required=required, metavar="FILE", help="YAML file or a shipped name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dot-list overrides, e.g. train.steps=10")


def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher inserts `--local_rank=N` before the subcommand (`-m vimoe_dist --local_rank=1 train
    ...`); the rank also arrives as LOCAL_RANK, so the argument is taken out wherever it stands."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    ensure_writable_caches()  # before anything imports torch, DeepSpeed or matplotlib
    parser = build_parser()
    args = parser.parse_args(strip_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        code = args.func(args)
    except UserError as e:
        # one write: print() sends the text and the newline separately, and the ranks of a job share a stream
        sys.stderr.write(f"vimoe {args.command}: error: {e}\n")
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
