"""Checkpoints: DeepSpeed's own save/load (every expert in a file of its own), made crash-safe, plus the per-rank
state DeepSpeed does not keep (data position, metric totals), and single-device loading for eval/export/analysis.

Layout of `run.out_dir/checkpoints/`:
    step_00000020/                      one tag per save
        mp_rank_00_model_states.pt      dense weights + client state (DeepSpeed)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per expert (DeepSpeed)
        expp_rank_{R}_mp_rank_00_optim_states.pt          optimizer state per expert-parallel rank (DeepSpeed)
        vimoe_rank_{r}.pt               our per-rank state
        COMPLETE                        written by rank 0 after every rank finished this tag
    latest                              the newest complete tag; replaced atomically, always last

A save counts only once `COMPLETE` and `latest` exist; both are written after an all-reduce that tells every rank
that every other one has its files on disk, so a crash in the middle of a save (kill -9 of any rank) leaves the
previous checkpoint the one resumed. DeepSpeed's own `latest` is never written (`save_latest=False`): it would name
the tag before all ranks finished. A full or read-only disk is one error naming the directory and the reason, agreed
on by every rank before DeepSpeed writes anything; weights with a NaN or inf are never saved.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vimoe_dist.config import Config
from vimoe_dist.errors import UserError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
EXPERT_KEY_RE = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")
NEARLY_FULL = 1 << 20  # bytes free below which a failed torch.save is reported as a full disk


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(root: Path, tag: str) -> int:
    """The step a tag holds: from its name (`step_N`), else from its client state (a tag named by hand)."""
    m = TAG_RE.match(tag)
    if m:
        return int(m.group(1))
    main = Path(root) / tag / "mp_rank_00_model_states.pt"
    try:
        return int(load_file(main).get("step", 0))
    except (UserError, ValueError, TypeError):
        return 0


def _atomic_write(path: Path, data: bytes) -> None:
    """Write-to-temp, fsync, rename, fsync the directory: readers see the old file or the whole new one, also after
    a power loss; a failed write leaves no temp file behind."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    tag_dir = root / tag

    bad = first_nonfinite(engine.module)
    flags = torch.tensor([0.0 if bad is None else 1.0])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.item():
        if bad is not None:
            log.error("rank %d: not saving %s: parameter %s is not finite; %s stays the latest checkpoint",
                      rank, tag, bad, latest_tag(root))  # fmt: skip
        return False

    if rank == 0 and tag_dir.is_dir():
        # leftovers of an earlier attempt at this step (a crashed save): the files must all come from this one
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()

    reason = ""
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(rank_state, buf)
        _atomic_write(tag_dir / f"vimoe_rank_{rank:05d}.pt", buf.getvalue())
        reason = _space_shortfall(root)
    except OSError as e:
        reason = f"{e.strerror or e} ({e.filename or tag_dir})"
    _agree(reason, rank, world, tag_dir, root)

    if fault_point is not None:
        fault_point(step)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:
        reason = f"{e.strerror or e} ({e.filename or tag_dir})"
    except RuntimeError as e:
        from vimoe_dist.train.peers import is_collective_failure

        if is_collective_failure(e):
            raise
        # torch.save reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
        reason = f"torch.save failed ({str(e).strip().splitlines()[0][:200]})"
        free = shutil.disk_usage(root).free
        if free < NEARLY_FULL:
            reason = f"no space left on device? {free:,} bytes free; {reason}"
    if reason:
        log.error("rank %d: cannot write checkpoint %s: %s", rank, tag_dir, reason)
        dist.barrier()  # stands in for the barrier that ends DeepSpeed's save on the ranks that got through it
    _agree(reason, rank, world, tag_dir, root)

    if rank == 0:
        try:
            _atomic_write(tag_dir / "COMPLETE", f"{world}\n".encode())
            _atomic_write(root / "latest", tag.encode())
            _prune(root, keep)
        except OSError as e:
            reason = f"{e.strerror or e} ({e.filename or root})"
            (tag_dir / "COMPLETE").unlink(missing_ok=True)
    _agree(reason, rank, world, tag_dir, root)
    return True


def _agree(reason: str, rank: int, world: int, tag_dir: Path, root: Path) -> None:
    """Every rank learns which ranks failed (a collective); each raises the same error, naming its own reason."""
    failed = torch.zeros(world)
    failed[rank] = 1.0 if reason else 0.0
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
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


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    complete = [t for t in tags if (root / t / "COMPLETE").exists()]
    latest = latest_tag(root)
    for t in complete[:-keep]:
        if t != latest:
            shutil.rmtree(root / t, ignore_errors=True)
    # incomplete tags older than the latest complete one are debris of a crashed save
    for t in tags:
        if t not in complete and latest and t < latest:
            shutil.rmtree(root / t, ignore_errors=True)


def latest_tag(root: Path) -> str | None:
    """The newest complete tag, or None. Falls back to scanning when `latest` is missing or points at debris."""
    root = Path(root)
    marker = root / "latest"
    if marker.is_file():
        tag = marker.read_text().strip()
        if (root / tag / "COMPLETE").is_file():
            return tag
    if not root.is_dir():
        return None
    complete = sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / "COMPLETE").is_file())
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A checkpoints root (uses its latest tag), a tag directory, or a run directory -> (root, tag)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "COMPLETE").is_file():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise UserError(f"checkpoint {str(path)!r}: no complete checkpoint there")
    return path, tag


def load_rank_state(root: Path, tag: str, rank: int) -> dict | None:
    path = root / tag / f"vimoe_rank_{rank:05d}.pt"
    if not path.is_file():
        return None
    return load_file(path)  # data position and metric totals: plain types


# Plain-data classes DeepSpeed pickles into ZeRO optimizer files (attributes or enum values only: unpickling them
# runs no code); allowed by name, imported only when a file needs them
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_file(path: Path, trust: bool = False, mmap: bool = False) -> dict:
    """One checkpoint file as tensors and plain data (`weights_only`): a checkpoint directory may come from anywhere
    (`vimoe eval --checkpoint`, `run.resume=DIR`), and unpickling anything else can run code. Every file our
    trainer and DeepSpeed write loads this way (with DEEPSPEED_SAFE_GLOBALS); `run.trust_checkpoint` lifts the
    restriction."""
    import importlib

    allowed: list = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
        except pickle.UnpicklingError as e:
            m = _GLOBAL_RE.search(str(e))
            if m and m.group(1) in DEEPSPEED_SAFE_GLOBALS and len(allowed) < len(DEEPSPEED_SAFE_GLOBALS):
                module, _, name = m.group(1).rpartition(".")
                allowed.append(getattr(importlib.import_module(module), name))
                continue
            what = f"it needs {m.group(1)}" if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(
                f"checkpoint file {str(path)!r} holds more than tensors and plain data ({what}); "
                "if you trust it, pass run.trust_checkpoint=true"
            ) from None
        except (OSError, RuntimeError, EOFError) as e:
            raise UserError(f"checkpoint file {str(path)!r} cannot be read: {str(e).strip()[:200]}") from None


def verify_loadable(root: Path, tag: str) -> None:
    """Checks, without reading the tensor data (mmap), that every file of a tag is tensors and plain data: DeepSpeed's
    `load_checkpoint` unpickles without restriction, so a checkpoint from elsewhere is vetted first."""
    for f in sorted((root / tag).glob("*.pt")):
        load_file(f, mmap=True)


def single_device_state_dict(root: Path, tag: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter of the model in single-device naming, gathered from DeepSpeed's files at any ep_size."""
    tag_dir = root / tag
    main = tag_dir / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise UserError(f"checkpoint {str(tag_dir)!r}: {main.name} is missing")
    module = load_file(main, trust)["module"]
    state = {k.replace(".deepspeed_moe.", "."): v for k, v in module.items()}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted(tag_dir.iterdir()):
        if not EXPERT_FILE_RE.match(f.name):
            continue
        for key, value in load_file(f, trust).items():
            m = EXPERT_KEY_RE.match(key)
            if m is None:
                raise UserError(f"checkpoint {str(f)!r}: unexpected key {key}")
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
    for (prefix, name), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise UserError(f"checkpoint {str(tag_dir)!r}: experts of {prefix} are incomplete ({ids})")
        state[f"{prefix}.experts.{name}"] = torch.stack([per_expert[i] for i in ids])
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_model(cfg: Config, checkpoint: str | Path) -> nn.Module:
    """The single-device model (every expert) of a checkpoint; needs no process group and no DeepSpeed engine."""
    from vimoe_dist.model import build_model

    root, tag = resolve_checkpoint(checkpoint)
    model_cfg = _without_pretrained(cfg)
    model = build_model(model_cfg.model)
    state = single_device_state_dict(root, tag, trust=cfg.run.trust_checkpoint)
    check_fits(model, state, f"{root / tag}")
    model.load_state_dict(state)
    return model.eval()


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """A checkpoint of another model is a one-line error naming the first key that differs."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise UserError(f"checkpoint {where!r} does not fit this model: it has no {key}")
        if state[key].shape != value.shape:
            raise UserError(
                f"checkpoint {where!r} does not fit this model: {key} is {tuple(state[key].shape)}, "
                f"the model's is {tuple(value.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"checkpoint {where!r} does not fit this model: unexpected {extra[0]}")


def _without_pretrained(cfg: Config) -> Config:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = None
    return cfg
