"""`vimoe train`, `vimoe eval`, `vimoe export`, `vimoe demo`."""

from __future__ import annotations

import argparse
import json
import sys

from vimoe_dist.cli import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (one rank of a job, or a single process)")
    add_config_args(p)  # the deepspeed launcher's --local_rank=N is taken out of argv by vimoe_dist.cli.main
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint; prints one JSON line with top1, top5, loss, images")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run dir, checkpoints dir or one tag dir")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write one safetensors file with every expert, loadable without DeepSpeed")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE", help="e.g. model.safetensors")
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="write the digits shards and train the demo expert-parallel on 2 CPU ranks")
    p.add_argument("--out", default="runs/digits", help="run directory")
    p.set_defaults(func=_demo)


def _load(args: argparse.Namespace):
    from vimoe_dist.config import load_config

    return load_config(args.config, args.overrides)


def _train(args: argparse.Namespace) -> int:
    from vimoe_dist.train.loop import train

    return train(_load(args))


def _eval(args: argparse.Namespace) -> int:
    import torch

    from vimoe_dist.analysis.loading import load_model
    from vimoe_dist.data import build_val_loader
    from vimoe_dist.train.evaluate import evaluate

    cfg = _load(args)
    model = load_model(cfg, args.checkpoint)
    result = evaluate(model, build_val_loader(cfg, 0, 1), torch.device("cpu"), progress=True)  # one process: rank 0
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


def _export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from vimoe_dist.analysis.loading import load_model

    cfg = _load(args)
    model = load_model(cfg, args.checkpoint)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"format": "vimoe", "backbone": cfg.model.backbone})
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vimoe_dist.train.demo import run_demo

    return run_demo(args.out)
