"""`vimoe data ...`: the shard writers and the manifest scanner. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write WebDataset shards (digits, synthetic, families, from an ImageFolder tree)")
    data = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)

    d = data.add_parser("digits", help="scikit-learn's 8x8 digits, fixed stratified 80/20 split (the demo data)")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and manifests")
    d.add_argument("--max-count", type=int, default=120, help="samples per shard (default 120: 12 train shards)")
    d.set_defaults(func=_digits)

    f = data.add_parser(
        "from-folder",
        help="image folders to shards: SRC/{train,val}/<class>/<image>, or one split's folder with --split",
        description="Writes DIR/<split>-NNNNNN.tar, DIR/<split>.json and DIR/classes.txt. ImageNet as shipped: "
        "`from-folder ILSVRC2012_img_train --split train --out DIR`, then `from-folder ILSVRC2012_img_val --split val "
        "--labels LOC_val_solution.csv --out DIR` (the val classes come from DIR/train.json). An existing data set in "
        "DIR is replaced only when the new one is complete.",
    )
    f.add_argument("src", metavar="SRC", help="root holding train/ (and val/), or with --split that split's folder")
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--split", choices=("train", "val"), help="SRC is this split's folder (class folders, or flat)")
    f.add_argument("--labels", metavar="FILE", help="labels of a flat val folder: a file,label CSV (or 'file label')")
    f.add_argument("--classes-from", metavar="PATH",
                   help="class order: a data set directory, a manifest, a classes.txt or the train class folders "
                   "(default: the train folders, or DIR/train.json for --split val)")  # fmt: skip
    f.add_argument("--max-count", type=int, default=1000, help="at most this many samples per shard")
    f.add_argument("--max-size", type=float, default=1e9, help="at most about this many bytes per shard")
    f.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    f.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle of the train samples")
    f.add_argument("--no-shuffle", action="store_true", help="keep the train samples in sorted (class) order")
    f.set_defaults(func=_from_folder)

    s = data.add_parser("synthetic", help="learnable synthetic images (class-dependent gratings) as JPEG")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--images", type=int, default=1000, help="train images")
    s.add_argument("--val-images", type=int, default=None, help="val images (default: a tenth)")
    s.add_argument("--size", type=int, default=64, metavar="PX", help="image side in pixels")
    s.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    s.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synthetic)

    fa = data.add_parser(
        "families",
        help="classes in visually distinct families (gratings, rings, blobs, ...): the router study's task",
    )
    fa.add_argument("--out", required=True, metavar="DIR")
    fa.add_argument("--families", type=int, default=4, help="kinds of pattern, 1-6 (default 4)")
    fa.add_argument("--per-family", type=int, default=4, help="classes per family, 2-8 (default 4)")
    fa.add_argument("--images", type=int, default=24000, help="train images (default 24000)")
    fa.add_argument("--val-images", type=int, default=8000, help="val images (default 8000)")
    fa.add_argument("--size", type=int, default=16, metavar="PX", help="image side in pixels (default 16)")
    fa.add_argument("--noise", type=float, default=0.2, help="std of the pixel noise, in [0, 1] (default 0.2)")
    fa.add_argument(
        "--object", type=int, default=0, metavar="PX",
        help="draw the pattern in a PX x PX window at a random place on a plain background (default 0: whole image)",
    )  # fmt: skip
    fa.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    fa.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    fa.add_argument("--seed", type=int, default=0)
    fa.set_defaults(func=_families)

    m = data.add_parser("manifest", help="count the samples and labels of existing shards into a manifest")
    m.add_argument("shards", nargs="+", help="shard patterns (brace patterns, globs, paths, URLs)")
    m.add_argument("--out", required=True, metavar="FILE", help="manifest to write, e.g. DIR/train.json")
    m.add_argument("--split", default="", help="split name stored in the manifest")
    m.add_argument("--allow-pipe", action="store_true", help="allow 'pipe:' shard sources")
    m.add_argument("--http-timeout", type=float, default=600.0, metavar="S", help="total seconds per http(s) shard")
    m.set_defaults(func=_manifest)


def _summary(manifests: dict) -> None:
    print(json.dumps({name: {"shards": len(m.shards), "samples": m.num_samples} for name, m in manifests.items()}))


def _check_counts(args: argparse.Namespace) -> None:
    from pathlib import Path

    from vimoe_dist.errors import UserError

    for name in ("max_count", "workers"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:  # an unwritable --out is one line here, not a traceback from a writer process
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create the directory ({e.strerror or e})") from None


def _digits(args: argparse.Namespace) -> int:
    from vimoe_dist.data.digits import write_digits

    _check_counts(args)
    _summary(write_digits(args.out, max_count=args.max_count, progress=True))
    return 0


def _from_folder(args: argparse.Namespace) -> int:
    from vimoe_dist.data.folder import write_from_folder

    _check_counts(args)
    manifests = write_from_folder(
        args.src, args.out, max_count=args.max_count, max_size=args.max_size, num_procs=args.workers,
        seed=args.seed, shuffle=not args.no_shuffle, split=args.split, labels=args.labels,
        classes_from=args.classes_from,
    )  # fmt: skip
    _summary(manifests)
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from vimoe_dist.data.synthetic import write_synthetic

    _check_counts(args)
    manifests = write_synthetic(
        args.out, num_classes=args.classes, num_images=args.images, size=args.size, num_val=args.val_images,
        max_count=args.max_count, num_procs=args.workers, seed=args.seed,
    )  # fmt: skip
    _summary(manifests)
    return 0


def _families(args: argparse.Namespace) -> int:
    from vimoe_dist.data.families import write_families

    _check_counts(args)
    manifests = write_families(
        args.out, num_families=args.families, per_family=args.per_family, num_images=args.images,
        num_val=args.val_images, size=args.size, noise=args.noise, object_size=args.object, max_count=args.max_count,
        num_procs=args.workers, seed=args.seed,
    )  # fmt: skip
    _summary(manifests)
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vimoe_dist.data.scan import scan_shards
    from vimoe_dist.data.sources import expand_shards
    from vimoe_dist.errors import UserError

    urls = expand_shards(list(args.shards), "shards", args.allow_pipe)
    if not args.http_timeout > 0:
        raise UserError(f"--http-timeout must be > 0, got {args.http_timeout}")
    manifest = scan_shards(urls, split=args.split, relative_to=Path(args.out).parent, http_timeout_s=args.http_timeout)
    manifest.write(args.out)
    _summary({args.split or "shards": manifest})
    return 0
