"""Does a checkpoint fit this run? Checked on every rank before DeepSpeed reads anything, so that a checkpoint of
another model (other experts, router, depth, width, classes) or an incomplete tag is one line naming the file and
the mismatch, instead of DeepSpeed's traceback or a silently fresh optimizer.

The files are opened without reading their tensors' data (mmap): the checks cost a few header reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.checkpoint_layout import (
    EXPERT_KEY_RE,
    MODEL_STATES,
    ep_optim_file,
    expert_file,
    load_file,
    zero_optim_file,
)
from vimoe_dist.parallel.layout import Layout

# what a parameter of another shape usually means, by the start of its key
HINTS = (("head.", "model.num_classes"), ("", "the width, model.backbone_kwargs.embed_dim"))
BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def expected_files(layout: Layout) -> list[str]:
    """Every file DeepSpeed writes for a tag saved at `layout` (vimoe's own files aside)."""
    files = [MODEL_STATES]
    files += [expert_file(layer, e) for layer, n in enumerate(layout.num_experts) for e in range(n)]
    if layout.zero_stage == 0:
        files += [ep_optim_file(r) for r in range(layout.ep_size)] if layout.num_experts else []
    else:
        files += [zero_optim_file(r, layout.precision == "bf16") for r in range(layout.world_size)]
    return files


def check_fits(root: Path, tag: str, saved: Layout, here: Layout, model: nn.Module, trust: bool = False) -> None:
    """Raises a UserError (one line) unless `root/tag`, saved at `saved`, can be resumed by `model` at `here`."""
    tag_dir = Path(root) / tag
    where = f"checkpoint {str(tag_dir)!r}"
    both = f"saved at {saved.describe()}; this run: {here.describe()}"
    if saved.num_experts != here.num_experts:
        what = ("model.moe.layers" if len(saved.num_experts) != len(here.num_experts)
                else "model.moe.num_experts")  # fmt: skip
        raise UserError(f"{where} does not fit this run ({what}): {both}")
    if saved.routers is not None and here.routers is not None and saved.routers != here.routers:
        raise UserError(f"{where} does not fit this run (model.moe.router): {both}")
    missing = next((f for f in expected_files(saved) if not (tag_dir / f).is_file()), None)
    if missing is not None:
        raise UserError(f"{where}: {missing} is missing (a tag saved at {saved.describe()} has it)")
    _check_dense(tag_dir, model, trust)
    _check_experts(tag_dir, model, saved, trust)


def _hint(key: str) -> str:
    return next(f" ({hint}?)" for prefix, hint in HINTS if key.startswith(prefix))


def _depth(keys) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := BLOCK_RE.match(k))), default=-1)


def _check_dense(tag_dir: Path, model: nn.Module, trust: bool) -> None:
    saved = load_file(tag_dir / MODEL_STATES, trust, mmap=True).get("module") or {}
    here = {k: v for k, v in model.state_dict().items() if not EXPERT_KEY_RE.match(k)}
    where = f"checkpoint file {str(tag_dir / MODEL_STATES)!r} does not fit this model"
    if _depth(saved) != _depth(here):
        raise UserError(f"{where}: {_depth(saved)} blocks there, {_depth(here)} here (model.backbone_kwargs.depth?)")
    for key, value in here.items():
        if key not in saved:
            raise UserError(f"{where}: it has no {key} (model.moe.layers, shared_expert?)")
        if tuple(saved[key].shape) != tuple(value.shape):
            raise UserError(f"{where}: {key} is {list(saved[key].shape)} there, {list(value.shape)} here{_hint(key)}")
    extra = next((k for k in saved if k not in here), None)
    if extra is not None:
        raise UserError(f"{where}: it has {extra}, which this model has not (model.moe.layers, shared_expert?)")


def _check_experts(tag_dir: Path, model: nn.Module, saved: Layout, trust: bool) -> None:
    """The first expert file of every MoE layer against the shapes of one expert of this model's bank."""
    here: dict[tuple[str, str], tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        m = EXPERT_KEY_RE.match(key)
        if m:
            here[(m.group(1), m.group(3))] = tuple(value.shape)
    for layer in range(len(saved.num_experts)):
        path = tag_dir / expert_file(layer, 0)
        for key, value in load_file(path, trust, mmap=True).items():
            m = EXPERT_KEY_RE.match(key)
            shape = here.get((m.group(1), m.group(3))) if m else None
            if shape is None:
                raise UserError(f"checkpoint file {str(path)!r} does not fit this model: it has {key}, which this "
                                "model has not (model.moe.layers?)")  # fmt: skip
            if tuple(value.shape) != shape:
                raise UserError(f"checkpoint file {str(path)!r} does not fit this model: an expert's {m.group(3)} is "
                                f"{list(value.shape)} there, {list(shape)} here (the width, or "
                                "model.moe.hidden_ratio?)")  # fmt: skip
