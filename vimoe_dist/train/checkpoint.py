"""Checkpoints: DeepSpeed's own save/load (every expert in a file of its own), made crash-safe, plus the per-rank
state DeepSpeed does not keep (data position, metric totals), and resuming from them.

What a tag directory holds, and under which names and keys, is defined once in `vimoe_dist/parallel/
checkpoint_layout.py` (also read by eval, export and analysis, which load a checkpoint as one single-device model).

A save counts only once `COMPLETE` and `latest` exist; both are written after an all-reduce that tells every rank
that every other one has its files on disk, so a crash in the middle of a save (kill -9 of any rank) leaves the
previous checkpoint the one resumed. DeepSpeed's own `latest` is never written (`save_latest=False`): it would name
the tag before all ranks finished. A full or read-only disk is one error naming the directory and the reason, agreed
on by every rank before DeepSpeed writes anything; weights with a NaN or inf are never saved.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vimoe_dist.atomic import write_atomic
from vimoe_dist.config import Config
from vimoe_dist.errors import UserError
from vimoe_dist.parallel import collectives
from vimoe_dist.parallel.checkpoint_fit import check_fits
from vimoe_dist.parallel.checkpoint_layout import (
    COMPLETE,
    LATEST,
    LAYOUT_KEY,
    MODEL_STATES,
    TAG_RE,
    load_file,
    rank_state_file,
    tag_for,
    verify_loadable,
)
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.parallel.env import DistEnv
from vimoe_dist.parallel.layout import engine_layout, saved_layout
from vimoe_dist.parallel.peers import is_collective_failure

log = logging.getLogger(__name__)

NEARLY_FULL = 1 << 20  # bytes free below which a failed torch.save is reported as a full disk
MAX_LATEST_BYTES = 4096  # a tag name, not a file to read into memory whatever its size


def step_of(root: Path, tag: str) -> int:
    """The step a tag holds: from its name (`step_N`), else from its client state (a tag named by hand)."""
    m = TAG_RE.match(tag)
    if m:
        return int(m.group(1))
    main = Path(root) / tag / MODEL_STATES
    try:
        return int(load_file(main).get("step", 0))
    except (UserError, ValueError, TypeError):
        return 0


def save(
    engine,
    root: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    keep: int,
    fault_point: Callable[[int], None] | None = None,
) -> bool:
    """Saves tag `step_N` on every rank (collective); returns False when it refused to save non-finite weights.

    Order: refuse non-finite weights; clear debris of an earlier attempt at this tag; this rank's state file (also a
    write probe) plus a free-space check against the last checkpoint's size, agreed on by every rank *before*
    DeepSpeed writes, since DeepSpeed's save has collectives inside that a rank failing half-way would leave
    unmatched; DeepSpeed's files (`save_latest=False`: its `latest` would point at a tag that may never complete);
    then, once every rank reports success, `COMPLETE` and `latest`. `fault_point` is the test hook
    (train/fault_hooks.py).

    Raises:
        UserError: naming the directory and the reason, when any rank cannot write; the last complete checkpoint
            stays the one `latest` names.
    """
    rank, world = collectives.rank(), collectives.world_size()
    tag = tag_for(step)
    tag_dir = root / tag

    bad = first_nonfinite(unwrap(engine))
    if collectives.any_rank(bad is not None):
        if bad is not None:
            log.error("rank %d: not saving %s: parameter %s is not finite; %s stays the latest checkpoint",
                      rank, tag, bad, latest_tag(root))  # fmt: skip
        return False

    reason = _clear_tag_dir(tag_dir) if rank == 0 else ""
    collectives.barrier()

    try:
        if not reason:
            tag_dir.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(rank_state, buf)
            write_atomic(tag_dir / rank_state_file(rank), buf.getvalue(), durable=True)
            reason = _space_shortfall(root)
    except OSError as e:
        reason = f"{e.strerror or e} ({e.filename or tag_dir})"
    _agree(reason, rank, world, tag_dir, root)

    if fault_point is not None:
        fault_point(step)
    # the layout the tag is saved at, by parameter name: what a resume at another layout converts from
    client_state = {**client_state, LAYOUT_KEY: engine_layout(engine, world).record()}
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:
        reason = f"{e.strerror or e} ({e.filename or tag_dir})"
    except RuntimeError as e:
        if is_collective_failure(e):
            raise
        # torch.save reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
        reason = f"torch.save failed ({str(e).strip().splitlines()[0][:200]})"
        free = shutil.disk_usage(root).free
        if free < NEARLY_FULL:
            reason = f"no space left on device? {free:,} bytes free; {reason}"
    if reason:
        log.error("rank %d: cannot write checkpoint %s: %s", rank, tag_dir, reason)
        collectives.barrier()  # stands in for the barrier that ends DeepSpeed's save on the ranks that got through it
    _agree(reason, rank, world, tag_dir, root)

    if rank == 0:
        try:
            write_atomic(tag_dir / COMPLETE, f"{world}\n", durable=True)
            write_atomic(root / LATEST, tag, durable=True)
            _prune(root, keep)
        except OSError as e:
            reason = f"{e.strerror or e} ({e.filename or root})"
            (tag_dir / COMPLETE).unlink(missing_ok=True)
    _agree(reason, rank, world, tag_dir, root)
    return True


def _agree(reason: str, rank: int, world: int, tag_dir: Path, root: Path) -> None:
    """Every rank learns which ranks failed (a collective); each raises the same error, naming its own reason."""
    failed = torch.zeros(world)
    failed[rank] = 1.0 if reason else 0.0
    collectives.all_reduce_sum(failed)
    if failed.sum().item() == 0:
        return
    if not reason:
        ranks = ", ".join(str(r) for r in range(world) if failed[r] > 0)
        reason = f"rank(s) {ranks} could not write (see their log)"
    raise UserError(f"cannot write checkpoint {str(tag_dir)!r}: {reason}; kept {latest_tag(root) or 'no checkpoint'}")


def _space_shortfall(root: Path) -> str:
    """Empty, or why the disk cannot hold another checkpoint of the size of the last complete one."""
    last = latest_tag(root)
    if last is None:
        return ""
    need = sum(f.stat().st_size for f in (root / last).iterdir() if f.is_file())
    free = shutil.disk_usage(root).free
    if free < need:
        return f"no space left on device: {free:,} bytes free, the last checkpoint took {need:,}"
    return ""


def first_nonfinite(module: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None (one pass over the weights, at save time)."""
    for name, p in module.named_parameters():
        if not torch.isfinite(p.detach()).all():
            return name
    return None


def _clear_tag_dir(tag_dir: Path) -> str:
    """Makes room for a new save at `tag_dir`; returns why it cannot ("" when it can). Leftovers of an earlier
    attempt at this step (a crashed save) go: the files must all come from this save. A symbolic link in the tag's
    place (to another run's directory, say) is removed, never written through."""
    try:
        if tag_dir.is_symlink() or (tag_dir.exists() and not tag_dir.is_dir()):
            log.warning("checkpoint %s is a symbolic link or not a directory: replacing it, not writing through it",
                        tag_dir)  # fmt: skip
            tag_dir.unlink()
        elif tag_dir.is_dir():
            shutil.rmtree(tag_dir)
    except OSError as e:
        return f"cannot clear the earlier attempt: {e.strerror or e} ({e.filename or tag_dir})"
    return ""


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and is_own_tag(root, p.name))
    complete = [t for t in tags if (root / t / COMPLETE).exists()]
    latest = latest_tag(root)
    for t in complete[:-keep]:
        if t != latest:
            shutil.rmtree(root / t, ignore_errors=True)
    # incomplete tags older than the latest complete one are debris of a crashed save
    for t in tags:
        if t not in complete and latest and t < latest:
            shutil.rmtree(root / t, ignore_errors=True)


def latest_tag(root: Path) -> str | None:
    """The newest complete tag of `root`, or None: the one `latest` names when that is a complete tag of this very
    directory (one path component, not a symbolic link: never `/abs/path` or `../other_run/...`); else, with a
    warning, the newest complete tag found by scanning (also when `latest` is missing, silently: a run that crashed
    before its first `latest`)."""
    root = Path(root)
    named, problem = _read_latest(root)
    if named is not None and is_own_tag(root, named) and (root / named / COMPLETE).is_file():
        return named
    if not root.is_dir():
        return None
    complete = sorted(
        p.name for p in root.iterdir() if TAG_RE.match(p.name) and is_own_tag(root, p.name) and (p / COMPLETE).is_file()
    )
    found = complete[-1] if complete else None
    if named is not None or problem:
        problem = problem or f"names {named!r}, which is not a complete checkpoint of this directory"
        _warn_once(root, f"{root / LATEST} {problem}; using {found or 'no checkpoint'} (the newest complete one found)")
    return found


def is_own_tag(root: Path, name: str) -> bool:
    """`name` is a tag directory of `root` itself: one path component, a real directory (not a symbolic link)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255:
        return False
    path = Path(root) / name
    return not path.is_symlink() and path.is_dir()


def _read_latest(root: Path) -> tuple[str | None, str]:
    """(the tag `latest` names, or None; what is wrong with the file itself, or "")."""
    marker = root / LATEST
    if not marker.exists() and not marker.is_symlink():
        return None, ""
    if not marker.is_file():
        return None, "is not a regular file"
    try:
        with open(marker, "rb") as f:
            raw = f.read(MAX_LATEST_BYTES + 1)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if len(raw) > MAX_LATEST_BYTES:
        return None, f"holds more than {MAX_LATEST_BYTES} bytes"
    try:
        return raw.decode("utf-8").strip(), ""
    except UnicodeDecodeError:
        return None, "holds bytes that are not UTF-8 text"


_warned: set[str] = set()


def _warn_once(root: Path, message: str) -> None:
    """latest_tag runs several times per save: the same finding is logged once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A checkpoints root (uses its latest tag), a tag directory, or a run directory -> (root, tag)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise UserError(f"checkpoint {str(path)!r}: no complete checkpoint there")
    return path, tag


def load_rank_state(root: Path, tag: str, rank: int) -> dict | None:
    path = root / tag / rank_state_file(rank)
    if not path.is_file():
        return None
    return load_file(path)  # data position and metric totals: plain types


def find_resume(cfg: Config, ckpt_root: Path) -> tuple[Path, str] | None:
    """(root, tag) to resume from as `run.resume` says (`auto`: this run's latest complete tag), or None."""
    mode = cfg.run.resume
    if mode == "never":
        existing = latest_tag(ckpt_root)
        if existing:
            raise UserError(
                f"run.resume=never: {str(ckpt_root.parent)!r} already holds a run (latest checkpoint {existing}), and "
                "a run directory holds one run: choose a new run.out_dir, continue this run with run.resume=auto, or "
                f"delete {str(ckpt_root)!r} to start over"
            )
        return None
    if mode == "auto":
        tag = latest_tag(ckpt_root)
        return (ckpt_root, tag) if tag else None
    return resolve_checkpoint(mode)


def resume(engine, cfg: Config, where: tuple[Path, str], env: DistEnv) -> tuple[int, dict]:
    """Loads weights, optimizer state and step at any layout, and this rank's data position and metric totals when
    the world size is unchanged. Returns (step, this rank's state).

    At the layout the tag was saved at, DeepSpeed's own loader reads its files. At another one (ranks, ep_size, ZeRO
    stage or precision), DeepSpeed loads the weights (stored one expert per file) and the optimizer state (Adam's
    moments and step counts, and the fp32 master weights) is converted per parameter (parallel/optim_state.py,
    optim_load.py): the run continues as if it had never changed layout.

    Raises:
        UserError: one line naming the file and the mismatch (or both layouts) when the checkpoint does not fit this
            model or layout; nothing is written.
    """
    from vimoe_dist.parallel.groups import expert_parallel_rank
    from vimoe_dist.parallel.optim_load import load_optimizer_state
    from vimoe_dist.parallel.optim_state import read_optimizer_state

    root, tag = where
    trust = cfg.run.trust_checkpoint
    if not trust:
        verify_loadable(root, tag)  # DeepSpeed's loader unpickles without restriction
    saved = saved_layout(root, tag, trust)
    here = engine_layout(engine, env.world_size)
    check_fits(root, tag, saved, here, unwrap(engine), trust)
    native = saved.same_optimizer_files(here)
    if not native and env.is_main:
        log.info("resuming %s saved at %s, here %s: converting the optimizer state", tag, saved.describe(),
                 here.describe())  # fmt: skip
    try:
        _, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=native,
                                           load_lr_scheduler_states=False, load_module_strict=True)  # fmt: skip
        if not native and client is not None:
            first = expert_parallel_rank(here.ep_size) * here.experts_per_rank
            mine = set(range(first, first + here.experts_per_rank))
            state = read_optimizer_state(root, tag, here.groups, trust, mine)
            load_optimizer_state(engine, state, here, repr(str(root / tag)))
    except (RuntimeError, KeyError, FileNotFoundError) as e:
        if isinstance(e, RuntimeError) and is_collective_failure(e):
            raise  # a peer died while loading: reported as such by train()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {str(root / tag)!r} does not fit this model or layout: {msg[:300]}") from None
    if client is None:
        raise UserError(f"checkpoint {str(root / tag)!r} could not be loaded")
    step = int(client["step"])
    rank_state = load_rank_state(root, tag, env.rank) if client.get("world_size") == env.world_size else None
    if rank_state is None and env.is_main:
        log.warning("resuming %s with world size %d (saved with %s): data position re-derived from the step",
                    tag, env.world_size, client.get("world_size"))  # fmt: skip
    if env.is_main:
        log.info("resumed from %s at step %d", root / tag, step)
    return step, rank_state or {}
