"""`vimoe data ...`: the shard writers. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write WebDataset shards (digits, synthetic, from an ImageFolder tree)")
    data = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)

    d = data.add_parser("digits", help="scikit-learn's 8x8 digits, fixed stratified 80/20 split (the demo data)")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and manifests")
    d.add_argument("--max-count", type=int, default=120, help="samples per shard")
    d.set_defaults(func=_digits)


def _summary(manifests: dict) -> None:
    print(json.dumps({name: {"shards": len(m.shards), "samples": m.num_samples} for name, m in manifests.items()}))


def _digits(args: argparse.Namespace) -> int:
    from vimoe_dist.data.digits import write_digits

    _summary(write_digits(args.out, max_count=args.max_count, progress=True))
    return 0
