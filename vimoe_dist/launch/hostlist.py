"""Slurm hostlist expressions and task-count lists, expanded in pure Python.

Slurm hands a job its nodes as a compressed hostlist (`SLURM_JOB_NODELIST=node[01-04,07],gpu-a[1-2]-b[3-4]`) and the
tasks per node as a run-length list (`SLURM_TASKS_PER_NODE=2(x3),1`). `scontrol show hostnames` expands the first,
but it is not installed where ranks usually run (containers, login-less compute images), so the job expands them
itself. The rules follow Slurm's `hostlist.c` as documented in `man scontrol` and are checked against the real
`scontrol show hostnames` in `tests/system/test_slurm_cluster.py`:

- the list is split on commas (and whitespace) outside brackets;
- each `[...]` holds comma-separated numbers or `lo-hi` ranges; a range keeps the width of its lower bound when that
  bound is zero-padded (`[08-10]` -> 08 09 10);
- several bracket groups in one name expand as a cartesian product, leftmost group outermost
  (`a[1-2]-b[3-4]` -> a1-b3 a1-b4 a2-b3 a2-b4);
- text after the last bracket group is an error (`n[1-2]x`), as in Slurm 22.05.
"""

from __future__ import annotations

import itertools
import re

from vimoe_dist.errors import UserError

# a sanity bound: a typo like node[1-100000000] should fail, not allocate a huge list
MAX_HOSTS = 1_000_000

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_hostlist(expr: str) -> list[str]:
    """Expands a Slurm hostlist expression into host names, in Slurm's order (duplicates kept, as Slurm does).

    Raises:
        UserError: on unbalanced brackets, an empty or reversed range, or a non-numeric bound.
    """
    hosts: list[str] = []
    for item in _split_top_level(expr):
        hosts.extend(_expand_one(item, expr))
        if len(hosts) > MAX_HOSTS:
            raise UserError(f"hostlist {expr!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def first_host(expr: str) -> str:
    """The first host of a hostlist, the one Slurm jobs conventionally use as MASTER_ADDR."""
    item = next(iter(_split_top_level(expr)), None)
    if item is None:
        raise UserError(f"hostlist {expr!r} is empty")
    return _expand_one(item, expr)[0]


def expand_tasks_per_node(expr: str) -> list[int]:
    """Expands Slurm's tasks-per-node list (`SLURM_TASKS_PER_NODE`, `SLURM_STEP_TASKS_PER_NODE`): `2(x3),1` means
    three nodes with 2 tasks then one node with 1.

    Raises:
        UserError: on an item that is not `N` or `N(xM)`.
    """
    counts: list[int] = []
    for item in expr.replace(" ", "").split(","):
        match = _TASKS_ITEM.match(item)
        if not match:
            raise UserError(f"tasks-per-node list {expr!r}: bad item {item!r} (expected N or N(xM))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _split_top_level(expr: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise UserError(f"hostlist {expr!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"hostlist {expr!r}: ']' without '[' at position {i}")
        elif depth == 0 and (ch == "," or ch.isspace()):
            items.append(expr[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"hostlist {expr!r}: unclosed '['")
    items.append(expr[start:])
    return [item for item in items if item]


def _expand_one(item: str, expr: str) -> list[str]:
    # alternate literal text and bracket groups: "gpu-a[1-2]-b[3-4]" -> ["gpu-a", [1,2], "-b", [3,4], ""]
    pieces = re.split(r"(\[[^\]]*\])", item)
    if len(pieces) > 1 and pieces[-1]:
        # Slurm rejects text after the last bracket group (`n[1-2]x`); so do we, rather than guess a meaning
        raise UserError(f"hostlist {expr!r}: text {pieces[-1]!r} after the last ']' in {item!r}")
    parts: list[list[str]] = []
    for piece in pieces:
        if piece.startswith("["):
            parts.append(_expand_ranges(piece[1:-1], expr))
        else:
            parts.append([piece])
    return ["".join(combo) for combo in itertools.product(*parts)]


def _expand_ranges(body: str, expr: str) -> list[str]:
    out: list[str] = []
    for rng in body.split(","):
        lo, sep, hi = rng.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UserError(f"hostlist {expr!r}: bad range {rng!r} (expected N or N-M)")
        if not sep:
            out.append(lo)
            continue
        start, stop = int(lo), int(hi)
        if stop < start:
            raise UserError(f"hostlist {expr!r}: reversed range {rng!r}")
        if stop - start + 1 > MAX_HOSTS:
            raise UserError(f"hostlist {expr!r}: range {rng!r} has more than {MAX_HOSTS} hosts")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(start, stop + 1))
    return out
