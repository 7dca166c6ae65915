"""The layout of a run and of a checkpoint: ranks, ep_size, ZeRO stage, precision, the MoE layers (experts and router
of each) and the optimizer's parameter groups by name.

A save records the run's layout in its model states file (`LAYOUT_KEY`, `record`); a resume compares it with its
own (`engine_layout`) to decide whether DeepSpeed's files load as they are (the same optimizer files) or the
optimizer state is converted (parallel/optim_state.py), and to refuse, in one line naming both layouts, a checkpoint
that cannot fit. A checkpoint saved before the record existed is read from DeepSpeed's own fields (its routers and
groups are then unknown).

The optimizer of a DeepSpeed engine is one of three kinds here (`optimizer_groups`): our torch AdamW itself (ZeRO 0,
fp32), DeepSpeed's FP16_UnfusedOptimizer around it (ZeRO 0, bf16: fp32 master copies, one per parameter) or a ZeRO
optimizer (stage 1/2: flat fp32 partitions, parameters mapped to their fragments by DeepSpeed's tensor-fragment
API).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.checkpoint_layout import LAYOUT_KEY, MODEL_STATES, load_file

RECORD_VERSION = 1
# (low-precision parameter groups, fp32 partitions) of DeepSpeed's ZeRO-style optimizers: DeepSpeedZeroOptimizer
# (ZeRO 1/2) and BF16_Optimizer (bf16 with fp32 gradient accumulation)
ZERO_GROUP_ATTRS = (("bit16_groups", "single_partition_of_fp32_groups"), ("bf16_groups", "fp32_groups_flat_partition"))


@dataclass(frozen=True)
class Layout:
    """Where every parameter and its optimizer state lives. `routers` and `groups` are None for a checkpoint saved
    before vimoe recorded them."""

    world_size: int
    ep_size: int
    zero_stage: int
    precision: str
    num_experts: tuple[int, ...]  # per MoE layer, in DeepSpeed's order (layer_{L}_expert_* files)
    routers: tuple[str, ...] | None = None  # per MoE layer
    groups: tuple[tuple[str, ...], ...] | None = None  # the optimizer's parameter groups, by parameter name

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts[0] // self.ep_size if self.num_experts else 0

    def describe(self) -> str:
        """One line: `4 ranks, ep_size 4, ZeRO 1, fp32: 2 MoE layers of 4 experts (1 per rank), router tc-softmax`."""
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        where = f"{ranks}, ep_size {self.ep_size}, ZeRO {self.zero_stage}, {self.precision}"
        if not self.num_experts:
            return f"{where}: no MoE layers"
        counts = sorted(set(self.num_experts))
        experts = "/".join(str(n) for n in counts)
        per_rank = "/".join(str(n // self.ep_size) if n % self.ep_size == 0 else f"{n}/{self.ep_size}" for n in counts)
        layers = f"{len(self.num_experts)} MoE layer{'s' if len(self.num_experts) != 1 else ''}"
        text = f"{where}: {layers} of {experts} experts ({per_rank} per rank)"
        if self.routers:
            text += f", router {'/'.join(sorted(set(self.routers)))}"
        return text

    def same_optimizer_files(self, other: Layout) -> bool:
        """Whether DeepSpeed's own loader reads the optimizer files of `self` into a run at `other`: everything that
        places a parameter must be unchanged; under ZeRO 0 the files are per expert-parallel rank (the rest is
        replicated), so the number of ranks may change."""
        mine = (self.ep_size, self.zero_stage, self.precision, self.num_experts)
        same = mine == (other.ep_size, other.zero_stage, other.precision, other.num_experts)
        return same and (self.zero_stage == 0 or self.world_size == other.world_size)

    def record(self) -> dict:
        """The plain-data form saved under LAYOUT_KEY."""
        return {
            "version": RECORD_VERSION,
            "world_size": self.world_size,
            "ep_size": self.ep_size,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "num_experts": list(self.num_experts),
            "routers": list(self.routers) if self.routers is not None else None,
            "groups": [list(g) for g in self.groups] if self.groups is not None else None,
        }


def precision_of(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32"


def saved_layout(root: Path, tag: str, trust: bool = False) -> Layout:
    """The layout `root/tag` was saved at, from its model states file (read without its tensors' data)."""
    path = Path(root) / tag / MODEL_STATES
    if not path.is_file():
        raise UserError(f"checkpoint {str(path.parent)!r}: {MODEL_STATES} is missing")
    return layout_from_states(load_file(path, trust, mmap=True), path)


def layout_from_states(states: dict, path: Path) -> Layout:
    """The layout recorded in a model states file; DeepSpeed's own fields for a tag saved before the record."""
    rec = states.get(LAYOUT_KEY)
    if isinstance(rec, dict) and rec.get("version") == RECORD_VERSION:
        return Layout(
            int(rec["world_size"]), int(rec["ep_size"]), int(rec["zero_stage"]), str(rec["precision"]),
            tuple(int(n) for n in rec["num_experts"]),
            tuple(rec["routers"]) if rec.get("routers") is not None else None,
            tuple(tuple(g) for g in rec["groups"]) if rec.get("groups") is not None else None,
        )  # fmt: skip
    ds = states.get("ds_config") or {}
    num_experts = states.get("num_experts") or []  # absent for a dense model (model.moe.layers=last-0)
    if not isinstance(num_experts, list | tuple) or "ep_size" not in states:
        raise UserError(f"checkpoint file {str(path)!r} was not written by vimoe train (no ep_size)")
    world = states.get("world_size", states.get("dp_world_size", 1))
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    return Layout(int(world), int(states["ep_size"]), zero, precision_of(ds), tuple(int(n) for n in num_experts))


def engine_layout(engine, world_size: int) -> Layout:
    """The layout of a live run (a DeepSpeed engine around a parallelized model)."""
    from vimoe_dist.parallel.adapter import DeepSpeedMoEAdapter

    adapters = [m for m in engine.module.modules() if isinstance(m, DeepSpeedMoEAdapter)]
    ep_size = adapters[0].ep_size if adapters else 1
    names = {p: n for n, p in engine.module.named_parameters()}
    _, groups = optimizer_groups(engine.optimizer)
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return Layout(
        world_size, ep_size, int(engine.zero_optimization_stage()), precision,
        tuple(a.num_experts for a in adapters), tuple(router_name(a.layer.router) for a in adapters),
        tuple(tuple(names[p] for p in g) for g in groups),
    )  # fmt: skip


def router_name(router: nn.Module) -> str:
    """The registered name of a router module (`tc-softmax`, ...), or its class name."""
    from vimoe_dist.model.moe.registry import ROUTER_SPECS

    cls = type(router).__name__
    return next((name for name, spec in ROUTER_SPECS.items() if spec.cls == cls), cls)


def optimizer_groups(optimizer) -> tuple[str, list[list[nn.Parameter]]]:
    """(kind, the model's parameters per optimizer group, in the optimizer's order) of a DeepSpeed engine's
    optimizer; kind is `torch` (ZeRO 0 fp32: our AdamW itself), `unfused` (ZeRO 0 bf16: FP16_UnfusedOptimizer) or
    `zero` (ZeRO 1/2)."""
    for lp_attr, _ in ZERO_GROUP_ATTRS:
        if hasattr(optimizer, lp_attr):
            return "zero", [list(g) for g in getattr(optimizer, lp_attr)]
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        return "unfused", [list(g) for g in optimizer.fp16_groups]
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch", [list(g["params"]) for g in optimizer.param_groups]
    raise UserError(f"checkpoint: optimizer {type(optimizer).__name__} cannot carry its state to another layout")
