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

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on data.val (on run.device: the GPU where there is one under auto); prints one "
        "JSON line with top1, top5, loss, images and the worst classes by name",
    )
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run dir, checkpoints dir or one tag dir")
    p.add_argument(
        "--per-class", metavar="FILE", help="also write per-class top-1 and each class's commonest confusion (CSV)"
    )
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
    from vimoe_dist.parallel.device import select_accelerator

    cfg = _load(args)
    select_accelerator(cfg.run.device)  # before the trainer's modules import DeepSpeed
    from vimoe_dist.train.loop import train

    return train(cfg)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from vimoe_dist.analysis.classes import find_class_names, per_class_rows, worst_classes, write_per_class
    from vimoe_dist.analysis.loading import load_model
    from vimoe_dist.data import build_val_loader
    from vimoe_dist.errors import UserError
    from vimoe_dist.parallel.device import resolve_device
    from vimoe_dist.train.evaluate import evaluate

    cfg = _load(args)
    if cfg.data.val is None:
        raise UserError("data.val: no validation data to evaluate on; set data.val=DIR")
    device = resolve_device(cfg.run.device)
    model = load_model(cfg, args.checkpoint).to(device)
    num_classes = cfg.model.num_classes
    confusion_CC = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    result = evaluate(
        model, build_val_loader(cfg, 0, 1), device, confusion_CC=confusion_CC, progress=True
    )  # one process: rank 0
    names = find_class_names(cfg, args.checkpoint)
    rows = per_class_rows(confusion_CC, names)
    result.update(device=str(device), classes_named=names is not None, worst_classes=worst_classes(rows))
    if args.per_class:
        result["per_class"] = str(write_per_class(args.per_class, rows))
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


def _export(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from vimoe_dist.analysis.classes import find_class_names
    from vimoe_dist.analysis.loading import load_model
    from vimoe_dist.errors import UserError

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: the directory {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; name the file to write, e.g. {out / 'model.safetensors'}")
    cfg = _load(args)
    model = load_model(cfg, args.checkpoint)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "vimoe", "backbone": cfg.model.backbone}
    names = find_class_names(cfg, args.checkpoint)
    if names is not None:  # index -> name, so that a served model can say what it predicts
        metadata["classes"] = json.dumps(names)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # a full disk leaves no torn file under the name asked for
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out {args.out}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    classes = f"{len(names)} class names in its metadata ('classes')" if names is not None else "no class names known"
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters, {classes}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vimoe_dist.train.demo import run_demo

    return run_demo(args.out)
