"""`vimoe config show`: the resolved config and the parallel layout it implies, after every check `vimoe train` makes
before it builds the model (vimoe_dist/preflight.py); `vimoe config list`: the shipped configs.

    vimoe config show --config vimoe_s14_imagenet --nodes 2 --gpus-per-node 8 data.train=/data/imagenet-wds/...
    vimoe config show --config configs/digits.yaml --nproc 2 train.global_batch_size=128
    vimoe config list

The output is the resolved config as YAML followed by the layout as YAML comments, so it can be saved and used as
a config file itself. Without `--nproc` or `--nodes`, the layout is that of the smallest job the config allows:
`parallel.ep_size` ranks.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vimoe_dist.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from vimoe_dist.cli import add_config_args

    p = sub.add_parser("config", help="show a resolved config and its layout; list the shipped configs")
    forms = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = forms.add_parser(
        "show", help="print the resolved config and the layout it implies, after the checks `vimoe train` makes"
    )
    add_config_args(show)
    show.add_argument("--nproc", type=int, metavar="N", help="ranks of the job (one node)")
    show.add_argument("--nodes", type=int, metavar="N", help="nodes of the job (with --gpus-per-node)")
    show.add_argument("--gpus-per-node", type=int, metavar="G", help="ranks per node (with --nodes)")
    show.set_defaults(func=_show)
    listing = forms.add_parser("list", help="the shipped configs, usable as --config NAME")
    listing.set_defaults(func=_list)


def world_size(cfg, nproc: int | None, nodes: int | None, gpus_per_node: int | None) -> tuple[int, str]:
    """The world size the flags ask for, and how it was arrived at (for the output)."""
    if nproc is not None and (nodes is not None or gpus_per_node is not None):
        raise UserError("give either --nproc or --nodes with --gpus-per-node, not both")
    if (nodes is None) != (gpus_per_node is None):
        raise UserError("--nodes and --gpus-per-node go together")
    for flag, value in (("--nproc", nproc), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if nproc is not None:
        return nproc, f"--nproc {nproc}"
    if nodes is not None:
        return nodes * gpus_per_node, f"--nodes {nodes} x --gpus-per-node {gpus_per_node}"
    return cfg.parallel.ep_size, "parallel.ep_size; set --nproc or --nodes/--gpus-per-node for the real job"


def layout_lines(cfg, report, how: str) -> list[str]:
    """The layout `cfg` implies on `report.world_size` ranks, one `label: value` line each."""
    from vimoe_dist.config import micro_batch_size

    t, p, moe = cfg.train, cfg.parallel, cfg.model.moe
    world = report.world_size
    micro = micro_batch_size(cfg, world)
    rows = [
        ("ranks", f"{world} ({how})"),
        ("expert-parallel groups", f"{world // p.ep_size} of {p.ep_size} ranks (parallel.ep_size)"),
        ("experts per rank", f"{moe.num_experts // p.ep_size} of {moe.num_experts} in each MoE block"),
        ("replicas of each expert", f"{world // p.ep_size} (gradients averaged over them)"),
        ("per-rank batch", f"{t.global_batch_size // world} images per step (train.global_batch_size / ranks)"),
        ("micro-batch", f"{micro} images per forward (train.grad_accum {t.grad_accum})"),
        ("routing groups per rank", f"{micro // moe.group_size} per micro-batch of {moe.group_size} images each"),
    ]
    for name, split in (("train", report.train), ("val", report.val)):
        if split is None:
            rows.append((f"{name} set", "none (data.val not set)"))
        elif split.num_samples is None:
            rows.append((f"{name} set", f"{split.num_shards:,} shards, size unknown (no manifest lists them)"))
        else:
            rows.append((f"{name} set", f"{split.num_samples:,} images in {split.num_shards:,} shards"))
    if report.train.num_samples:
        per_epoch = report.train.num_samples / t.global_batch_size
        epochs = t.steps / per_epoch
        rows.append(("steps per epoch", f"{per_epoch:,.1f} (train.steps {t.steps:,} = {epochs:,.2f} epochs)"))
    else:
        rows.append(("steps per epoch", "unknown (the train set's size is in no manifest)"))
    width = max(len(label) for label, _ in rows) + 1
    return [f"{label + ':':<{width}} {value}" for label, value in rows]


def _show(args: argparse.Namespace) -> int:
    import yaml

    from vimoe_dist.config import load_config, to_dict
    from vimoe_dist.preflight import preflight

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    cfg = load_config(args.config, args.overrides)
    world, how = world_size(cfg, args.nproc, args.nodes, args.gpus_per_node)
    report = preflight(cfg, world)
    out = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    out += "# layout\n" + "".join(f"#   {line}\n" for line in layout_lines(cfg, report, how))
    out += "# the checks `vimoe train` makes before building the model passed (config, layout, data paths)\n"
    sys.stdout.write(out)
    return 0


def _list(args: argparse.Namespace) -> int:
    from vimoe_dist.resources import shipped_configs

    for name, path in shipped_configs().items():
        print(f"{name:<28} {path}")
    return 0
