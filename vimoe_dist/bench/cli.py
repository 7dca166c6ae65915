"""`vimoe bench moe|train|data|all`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: print a table, write JSON (ratios measured side by side)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    m = bsub.add_parser("moe", help="one MoE FFN per router and per library against k x dense")
    _moe_arguments(m)
    m.set_defaults(func=_moe)
    t = bsub.add_parser("train", help="training images/s: ViMoE vs dense ViT, ep_size 2 vs 1 on 2 ranks")
    train_arguments(t)
    t.set_defaults(func=_train)
    d = bsub.add_parser("data", help="the WebDataset pipeline against torchvision's ImageFolder")
    d.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke run)")
    d.add_argument("--out", default="bench/results/data.json")
    d.set_defaults(func=_data)
    from vimoe_dist.bench.soak import register_soak  # imports nothing heavy

    register_soak(bsub)
    a = bsub.add_parser("all", help="moe, train and data with their defaults")
    a.set_defaults(func=_all)


def _moe(args: argparse.Namespace) -> int:
    from vimoe_dist.bench.moe import run

    run(args)
    return 0


def _train(args: argparse.Namespace) -> int:
    from vimoe_dist.bench.train import run

    run(args)
    return 0


def _data(args: argparse.Namespace) -> int:
    from vimoe_dist.bench.data import run_data_bench

    run_data_bench(args.out, quick=args.quick)
    return 0


def _all(args: argparse.Namespace) -> int:
    from vimoe_dist.cli import build_parser

    parser = build_parser()
    for name in ("moe", "train", "data"):
        sub = parser.parse_args(["bench", name])
        sub.func(sub)
    return 0


def _moe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--tokens", type=int, default=196)
    p.add_argument("--group-size", type=int, default=8, help="images per routing group")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--only", default="", help="comma-separated variant names (dense baselines always run)")
    p.add_argument("--out", default="bench/results/moe.json")


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--batch", type=int, default=64, help="global batch (split over the 2 ranks in the ep runs)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--skip-ep", action="store_true", help="only ViMoE vs dense")
    p.add_argument("--out", default="bench/results/train.json")
    p.add_argument("overrides", nargs="*", metavar="key=value")
