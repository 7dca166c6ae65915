"""`vimoe checkpoint info RUN` and `vimoe checkpoint reshard RUN --ep-size N`: a run's checkpoints without a job.

    vimoe checkpoint info runs/digits                        # tags, steps, layouts, sizes; files each rank reads
    vimoe checkpoint info runs/digits --ep-size 1 --world-size 1   # ... to resume the latest at that layout
    vimoe checkpoint reshard runs/digits --ep-size 2         # write its optimizer state in the layout-free form

`vimoe train` resumes a checkpoint at any layout by itself (it converts DeepSpeed's per-rank optimizer files per
parameter); `reshard` does that conversion once, offline, into the tag (vimoe_optim/), so that each rank of the new
layout reads only its own share, and checks beforehand that the new layout fits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="a run's checkpoints: info, and resharding the optimizer state offline")
    csub = p.add_subparsers(dest="checkpoint", metavar="ACTION", required=True)
    i = csub.add_parser("info", help="tags, steps, layouts, sizes, and the files each rank reads to resume")
    _common(i)
    i.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    i.set_defaults(func=_info)
    r = csub.add_parser("reshard", help="write a tag's optimizer state per parameter, readable at any layout")
    _common(r)
    r.set_defaults(func=_reshard)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory, its checkpoints/ directory, or one tag directory")
    p.add_argument("--tag", help="the tag (default: the latest complete one)")
    p.add_argument("--ep-size", type=int, help="the expert-parallel size to resume at (default: the saved one)")
    p.add_argument("--world-size", type=int, help="the number of ranks to resume at (default: the saved one)")


def _where(args: argparse.Namespace) -> tuple[Path, str]:
    from vimoe_dist.train.checkpoint import resolve_checkpoint

    root, tag = resolve_checkpoint(args.run)
    return root, args.tag or tag


def _info(args: argparse.Namespace) -> int:
    from vimoe_dist.parallel.checkpoint_plan import compress, list_tags, rank_files, tag_summary, target_layout
    from vimoe_dist.parallel.layout import saved_layout
    from vimoe_dist.train.checkpoint import latest_tag

    root, tag = _where(args)
    summaries = [tag_summary(root, t) for t in list_tags(root)]
    saved = saved_layout(root, tag)
    target = target_layout(saved, args.ep_size, args.world_size, f"checkpoint {str(root / tag)!r}")
    layout_free = any(s["tag"] == tag and s["layout_free_optimizer"] for s in summaries)
    ranks = [rank_files(saved, target, r, layout_free) for r in range(target.world_size)]
    native = saved.same_optimizer_files(target)
    if args.json:
        plan = {"tag": tag, "at": target.describe(), "native": native, "ranks": ranks}
        print(json.dumps({"root": str(root), "latest": latest_tag(root), "tags": summaries, "resume": plan}))
        return 0
    print(f"checkpoints in {root} (latest complete: {latest_tag(root) or 'none'})")
    print(f"  {'tag':<16}{'step':>8}  {'complete':<9}{'size':>10}  layout")
    for s in summaries:
        size = f"{s['bytes'] / 2**20:.1f} MiB"
        extra = " + layout-free optimizer state" if s["layout_free_optimizer"] else ""
        print(f"  {s['tag']:<16}{s['step'] if s['step'] is not None else '-':>8}  "
              f"{'yes' if s['complete'] else 'NO':<9}{size:>10}  {s['layout'] or s.get('error')}{extra}")  # fmt: skip
    how = ("DeepSpeed's own files, as saved" if native else
           "the layout-free optimizer state" if layout_free else
           "optimizer state converted from every optimizer file (`vimoe checkpoint reshard` cuts this to each "
           "rank's share)")  # fmt: skip
    print(f"resuming {tag} at {target.describe()}: {how}")
    for r, files in enumerate(ranks):
        print(f"  rank {r}: {', '.join(compress(files))}")
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from vimoe_dist.parallel.checkpoint_layout import OPTIM_DIR
    from vimoe_dist.parallel.checkpoint_plan import compress, rank_files, target_layout
    from vimoe_dist.parallel.layout import saved_layout
    from vimoe_dist.parallel.optim_state import read_optimizer_state, write_layout_free

    root, tag = _where(args)
    where = f"checkpoint {str(root / tag)!r}"
    saved = saved_layout(root, tag)
    target = target_layout(saved, args.ep_size, args.world_size, where)
    state = read_optimizer_state(root, tag)  # every file checked and read before anything is written
    written = write_layout_free(state, root / tag)
    size = sum(f.stat().st_size for f in written)
    what = f"{len(state.dense)} dense parameters and {len(state.experts)} expert banks"
    print(f"{where}: wrote {len(written)} files ({size / 2**20:.1f} MiB) to {root / tag / OPTIM_DIR}: the "
          f"optimizer state of {what}, one file per expert")  # fmt: skip
    print(f"resuming it at {target.describe()} (parallel.ep_size={target.ep_size}), each rank reads its share; "
          f"rank 0: {', '.join(compress(rank_files(saved, target, 0, True)))}")  # fmt: skip
    return 0
