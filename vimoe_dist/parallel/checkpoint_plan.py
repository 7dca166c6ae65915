"""What a checkpoint directory holds and what resuming it costs: its tags (step, complete or not, layout, size) and,
for a layout to resume at, which files each rank reads (`vimoe checkpoint info`), and the layout-free optimizer state
written for any layout (`vimoe checkpoint reshard`).

At the layout a tag was saved at, rank r reads the model states, its own experts' files, its own optimizer file and
its data position. At another layout it reads its experts' files too (weights are stored one expert per file), and
the optimizer state of its parameters: from every one of DeepSpeed's optimizer files (they are per rank of the old
layout), or, once `vimoe checkpoint reshard` wrote the layout-free form, from its dense file and its experts' files
alone.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.checkpoint_fit import expected_files
from vimoe_dist.parallel.checkpoint_layout import (
    COMPLETE,
    MODEL_STATES,
    OPTIM_DENSE,
    OPTIM_DIR,
    TAG_RE,
    ep_optim_file,
    expert_file,
    optim_expert_file,
    rank_state_file,
    zero_optim_file,
)
from vimoe_dist.parallel.layout import Layout, saved_layout


def target_layout(saved: Layout, ep_size: int | None, world_size: int | None, where: str) -> Layout:
    """`saved` moved to `ep_size` experts-parallel ranks on `world_size` ranks (each defaults to the saved one).

    Raises:
        UserError: naming both layouts, when the experts or ranks do not divide.
    """
    ep = ep_size or saved.ep_size
    world = world_size or max(saved.world_size, ep)
    target = replace(saved, ep_size=ep, world_size=world)
    problem = ""
    if ep < 1 or world < 1:
        problem = "ep_size and the number of ranks must be positive"
    elif any(n % ep for n in saved.num_experts):
        problem = f"ep_size {ep} does not divide the {'/'.join(map(str, sorted(set(saved.num_experts))))} experts"
    elif world % ep:
        problem = f"ep_size {ep} does not divide the {world} ranks"
    if problem:
        raise UserError(f"{where}, saved at {saved.describe()}, cannot resume at ep_size {ep} on {world} ranks: "
                        f"{problem}")  # fmt: skip
    return target


def rank_files(saved: Layout, target: Layout, rank: int, layout_free: bool) -> list[str]:
    """The files of a tag saved at `saved` that rank `rank` of a run at `target` reads to resume it."""
    per_rank = target.experts_per_rank
    first = (rank % target.ep_size) * per_rank
    mine = range(first, first + per_rank)
    files = [MODEL_STATES] + [expert_file(layer, e) for layer in range(len(saved.num_experts)) for e in mine]
    if saved.same_optimizer_files(target):
        if saved.zero_stage == 0:
            files += [ep_optim_file(rank % saved.ep_size)] if saved.num_experts else []
        else:
            files += [zero_optim_file(rank, saved.precision == "bf16")]
    elif layout_free:
        files += [f"{OPTIM_DIR}/{OPTIM_DENSE}"]
        files += [f"{OPTIM_DIR}/{optim_expert_file(layer, e)}" for layer in range(len(saved.num_experts)) for e in mine]
    else:
        files += [f for f in expected_files(saved) if f.endswith("_optim_states.pt")]
    if target.world_size == saved.world_size:
        files.append(rank_state_file(rank))
    return files


def compress(files: list[str]) -> list[str]:
    """Runs of names that differ in one number, counting up, as one brace range: layer_0_expert_{0..3}_mp_rank_00_..."""
    parts = [re.split(r"(\d+)", f) for f in files]
    out, i = [], 0
    while i < len(files):
        j, k = i + 1, None
        while j < len(files) and len(parts[j]) == len(parts[i]):
            diff = [p for p in range(len(parts[i])) if parts[j][p] != parts[i][p]]
            if len(diff) != 1 or diff[0] % 2 == 0 or (k is not None and diff[0] != k):
                break
            if int(parts[j][diff[0]]) != int(parts[j - 1][diff[0]]) + 1:
                break
            k, j = diff[0], j + 1
        if k is None:
            out.append(files[i])
        else:
            out.append("".join(parts[i][:k]) + f"{{{parts[i][k]}..{parts[j - 1][k]}}}" + "".join(parts[i][k + 1 :]))
        i = j
    return out


def tag_summary(root: Path, tag: str) -> dict:
    """Step, completeness, size, layout (or why it cannot be read) and whether it has the layout-free form."""
    tag_dir = Path(root) / tag
    files = [f for f in tag_dir.rglob("*") if f.is_file()]
    summary = {
        "tag": tag,
        "step": int(TAG_RE.match(tag).group(1)) if TAG_RE.match(tag) else None,
        "complete": (tag_dir / COMPLETE).is_file(),
        "bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
        "layout_free_optimizer": (tag_dir / OPTIM_DIR / OPTIM_DENSE).is_file(),
    }
    try:
        summary["layout"] = saved_layout(root, tag).describe()
    except UserError as e:
        summary["layout"] = None
        summary["error"] = str(e)
    return summary


def list_tags(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"checkpoint {str(root)!r}: no such directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
