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

A save counts only once `COMPLETE` and `latest` exist; both are written after a barrier that every rank reaches only
when its own files are on disk, so a crash in the middle of a save leaves the previous checkpoint the one resumed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
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


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: Path, step: int, client_state: dict, rank_state: dict, keep: int) -> None:
    """Saves tag `step_N` on every rank; raises UserError (naming the directory) when it cannot be written."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = root / tag
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        torch.save(rank_state, buf)
        _atomic_write(tag_dir / f"vimoe_rank_{rank:05d}.pt", buf.getvalue())
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        ok = torch.tensor([1.0])
    except OSError as e:
        log.error("rank %d: cannot write checkpoint %s: %s", rank, tag_dir, e)
        ok = torch.tensor([0.0])
    # every rank learns whether every other rank succeeded; only then is the tag marked complete
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() < 1:
        raise UserError(f"cannot write checkpoint {tag_dir} (disk full or not writable?); kept {latest_tag(root)}")
    if rank == 0:
        _atomic_write(tag_dir / "COMPLETE", f"{dist.get_world_size()}\n".encode())
        _atomic_write(root / "latest", tag.encode())
        _prune(root, keep)
    dist.barrier()


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
    return torch.load(path, map_location="cpu", weights_only=False)  # we wrote it: data/metric state, plain types


def _load_ours(path: Path) -> dict:
    """Files of our own checkpoints; DeepSpeed stores a few config objects next to the tensors."""
    return torch.load(path, map_location="cpu", weights_only=False)


def single_device_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Every parameter of the model in single-device naming, gathered from DeepSpeed's files at any ep_size."""
    tag_dir = root / tag
    main = tag_dir / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise UserError(f"checkpoint {str(tag_dir)!r}: {main.name} is missing")
    module = _load_ours(main)["module"]
    state = {k.replace(".deepspeed_moe.", "."): v for k, v in module.items()}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted(tag_dir.iterdir()):
        if not EXPERT_FILE_RE.match(f.name):
            continue
        for key, value in _load_ours(f).items():
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
    state = single_device_state_dict(root, tag)
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
