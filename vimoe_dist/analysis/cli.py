"""`vimoe analyze routing`, `vimoe prune`, `vimoe study layers|routers|plot`: the ViMoE study tools on the command line.

    vimoe analyze routing --checkpoint runs/digits --out runs/digits/routing
    vimoe prune --checkpoint runs/digits --keep-layers 5 --out runs/digits/pruned
    vimoe train --config runs/digits/pruned/config.yaml          # fine-tune the pruned model
    vimoe study layers --config configs/digits.yaml --L 0,1,2,4 --both --out runs/study
    vimoe study layers --config configs/vimoe_s.yaml --L 0,2,4,6,8 --slurm --gpus-per-node 8 --out runs/study
    vimoe study plot runs/study
    vimoe study routers --config configs/router_study.yaml --seeds 3 --out runs/router_study

The analysis runs the validation set through one process by default; started as several ranks (torchrun, srun),
each rank runs its share of the data on a full single-device copy of the model and the statistics are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vimoe_dist.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from vimoe_dist.cli import add_config_args

    fmt = argparse.RawDescriptionHelpFormatter
    an = sub.add_parser("analyze", help="routing analysis of a trained ViMoE", description=__doc__, formatter_class=fmt)
    kinds = an.add_subparsers(dest="kind", metavar="KIND", required=True)
    ro = kinds.add_parser(
        "routing",
        help="class x expert routing matrices, specialisation scores, heatmaps, which MoE layers to keep",
        description=__doc__,
        formatter_class=fmt,
    )
    _add_checkpoint_args(ro)
    ro.add_argument("--out", required=True, metavar="DIR", help="writes routing.json, matrices.pt, heatmaps/")
    ro.add_argument("--min-specialisation", type=float, default=0.3, help="keep rule threshold (default 0.3)")
    ro.add_argument("--min-dependence", type=float, default=0.05, help="keep rule threshold (default 0.05)")
    ro.add_argument("--chance-margin", type=float, default=0.1, help="keep rule margin over chance (default 0.1)")
    add_config_args(ro, required=False)
    ro.set_defaults(func=_analyze_routing)

    pr = sub.add_parser(
        "prune",
        help="turn the MoE layers not kept into dense FFNs; writes a checkpoint to fine-tune from",
        description=__doc__,
        formatter_class=fmt,
    )
    _add_checkpoint_args(pr)
    pr.add_argument("--keep-layers", required=True, metavar="I,J|none", help="MoE blocks to keep, e.g. 9,11")
    pr.add_argument("--out", required=True, metavar="DIR", help="writes model.safetensors, config.yaml, prune.json")
    pr.add_argument(
        "--mode",
        choices=("shared", "average"),
        help="dense FFN of a pruned layer: the shared expert alone (the default when there is one: the result has the "
        "backbone's shapes), or the load-weighted average of the experts (plus the shared expert, side by side)",
    )
    add_config_args(pr, required=False)
    pr.set_defaults(func=_prune)

    st = sub.add_parser(
        "study", help="the ViMoE layer study: sweep over L, Figure 2", description=__doc__, formatter_class=fmt
    )
    studies = st.add_subparsers(dest="study", metavar="STUDY", required=True)
    la = studies.add_parser(
        "layers",
        help="train with MoE in the last L blocks for each L, then plot top-1 against L",
        description=__doc__,
        formatter_class=fmt,
    )
    la.add_argument("--L", required=True, metavar="L1,L2,...", help="numbers of MoE blocks, e.g. 0,2,4,6")
    variant = la.add_mutually_exclusive_group()
    variant.add_argument("--no-shared-expert", action="store_true", help="sweep without the shared expert")
    variant.add_argument("--both", action="store_true", help="sweep with and without the shared expert")
    la.add_argument(
        "--out", default="runs/study", metavar="DIR", help="one run directory per point (default runs/study)"
    )
    la.add_argument(
        "--launch",
        default=sys.executable,
        metavar="PREFIX",
        help="what runs `-m vimoe_dist train ...` for each point, e.g. 'torchrun --nproc_per_node 2' "
        "(default: this Python, one process)",
    )
    la.add_argument("--dry-run", action="store_true", help="print the commands (or the sbatch script) only")
    sl = la.add_argument_group("Slurm array (instead of running the points one after the other here)")
    sl.add_argument("--slurm", action="store_true", help="submit the sweep as one Slurm job array")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=0)
    sl.add_argument("--ntasks-per-node", type=int)
    sl.add_argument("--cpus-per-task", type=int)
    sl.add_argument("--partition")
    sl.add_argument("--time", help="time limit per point (Slurm format)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION[=VALUE]", help="extra #SBATCH line")
    sl.add_argument("--wait", action="store_true", help="wait for the array to end, then plot")
    add_config_args(la)
    la.set_defaults(func=_study_layers)

    from vimoe_dist.analysis.study_routers import register as register_study_routers

    register_study_routers(studies, fmt)

    pl = studies.add_parser("plot", help="top-1 against L from the runs of a study directory (Figure 2)")
    pl.add_argument("dir", metavar="DIR", help="the --out of `vimoe study layers`")
    pl.set_defaults(func=_study_plot)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a run's checkpoint directory, a `vimoe prune` output directory, or a weights file",
    )
    p.add_argument("--data", metavar="SHARDS", help="validation shards (default: the config's data.val)")


def _prepare(args: argparse.Namespace):
    """Config, ranks, device and model shared by analyze and prune."""
    from vimoe_dist.analysis.loading import load_model, resolve_config
    from vimoe_dist.analysis.ranks import init_ranks

    cfg = resolve_config(args.config, args.checkpoint, list(args.overrides), args.data)
    if cfg.data.val is None:
        raise UserError("data.val: no validation shards; pass --data SHARDS or set data.val")
    rank, world, device = init_ranks(cfg)
    model = load_model(cfg, args.checkpoint).to(device)
    return cfg, rank, world, device, model


def _analyze_routing(args: argparse.Namespace) -> int:
    from vimoe_dist.analysis.classes import find_class_names
    from vimoe_dist.analysis.collect import run_routing
    from vimoe_dist.analysis.recommend import RecommendConfig
    from vimoe_dist.analysis.report import build_report, summary_lines, write_report
    from vimoe_dist.data import build_val_loader
    from vimoe_dist.model import moe_layers

    cfg, rank, world, device, model = _prepare(args)
    if not moe_layers(model):
        raise UserError(f"model.moe.layers={cfg.model.moe.layers!r}: the model has no MoE layer to analyse")
    result = run_routing(model, build_val_loader(cfg, rank, world), cfg.model.num_classes, device, "analyze routing")
    if rank != 0:
        return 0
    rec_cfg = RecommendConfig(args.min_specialisation, args.min_dependence, args.chance_margin)
    meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "ranks": world, "device": str(device)}
    names = find_class_names(cfg, args.checkpoint)
    report = build_report(result.routing, result.top1, result.images, len(model.blocks), rec_cfg, meta, names)
    paths = write_report(args.out, report, result.routing, names)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {paths[0]}, {paths[1]}, {len(paths) - 2} heatmaps", flush=True)
    return 0


def _prune(args: argparse.Namespace) -> int:
    from vimoe_dist.analysis.prune_run import check_out_dir, prune_checkpoint

    check_out_dir(args.out)  # before any work: never into a training run's directory
    cfg, rank, world, device, model = _prepare(args)
    report = prune_checkpoint(cfg, model, args.keep_layers, args.mode, args.out, rank, world, device, args.checkpoint)
    if rank == 0:
        print(
            f"top-1 before {report['top1_before']:.4f}, after {report['top1_after']:.4f} ({report['images']} images); "
            f"pruned blocks {report['pruned'] or 'none'} ({report['mode']}), kept {report['keep'] or 'none'}"
        )
        if report["pruned"]:
            sizes = ", ".join(f"block {b}: {h}" for b, h in report["dense_ffn_hidden"].items())
            print(f"hidden units of the new dense FFNs: {sizes}")
        print(f"wrote {report['weights']} and {report['config']}; fine-tune: vimoe train --config {report['config']}")
        print(json.dumps({k: report[k] for k in ("top1_before", "top1_after", "images", "keep", "pruned", "mode")}))
    return 0


def _study_layers(args: argparse.Namespace) -> int:
    from vimoe_dist.analysis.study import run_study

    return run_study(args)


def _study_plot(args: argparse.Namespace) -> int:
    from vimoe_dist.analysis.study import plot_study_dir

    path, results = plot_study_dir(args.dir)
    for r in results:
        print(f"L={r['L']:<3} {r['variant']:<10} top-1 {r['top1']:.4f}  {r['run']}")
    print(f"wrote {path}")
    return 0
