"""A checkpoint's optimizer state per parameter, whole (Adam's moments, its step count and, where training keeps one,
the fp32 master weights), whatever layout wrote it: read from DeepSpeed's per-rank files, or from our layout-free
form (`vimoe_optim/`, written by `vimoe checkpoint reshard`), and written in that form. Loading it into a run at
another layout is parallel/optim_load.py.

Why not DeepSpeed's Universal Checkpoint (deepspeed/checkpoint/ds_to_universal.py, 0.19.8): it merges the ZeRO
fragments of a parameter over all data-parallel ranks, but an expert bank of a native MoE layer has the same name on
every expert-parallel rank and is partitioned over its expert-data-parallel group only, so the merge mixes the banks
of different ranks (only AutoEP layers are consolidated); and universal loading exists for ZeRO 1-3 only, not for
ZeRO 0 (our AdamW itself, or FP16_UnfusedOptimizer under bf16). The conversion is therefore written here, on top of
DeepSpeed's files, and does what its universal loader does for expert parameters: banks are stacked on dim 0, so
the rank at position r of an expert-parallel group of size P takes experts [r E/P, (r+1) E/P) of the whole.

How DeepSpeed's files place a parameter (the "E + D" groups of parallel/groups.py):
  ZeRO 0  `expp_rank_{R}`: a torch optimizer state dict of expert-parallel rank R (state by position in the
          groups, no names: the names come from the layout record); dense parameters are the same on every R,
          expert banks hold R's experts. Under bf16, FP16_UnfusedOptimizer adds one fp32 master per parameter.
  ZeRO 1/2 `[bf16_]zero_pp_rank_{D}`: one flat fp32 partition per group, with DeepSpeed's map of which fragment of
          which parameter (by name) it holds. A dense group is split over all ranks D in order; an expert group over
          the ranks of one expert-parallel position r (D = r, r + P, r + 2P, ...), whose fragments, in that order,
          make up r's bank.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.checkpoint_layout import (
    EXPERT_PARAM_RE,
    MODEL_STATES,
    OPTIM_DENSE,
    OPTIM_DIR,
    OPTIM_EXPERT_RE,
    ep_optim_file,
    load_file,
    optim_expert_file,
    zero_optim_file,
)
from vimoe_dist.parallel.layout import Layout, layout_from_states

FP32 = "fp32"  # the key of the master weights among a parameter's tensors


@dataclass
class ParamState:
    """One parameter's optimizer state: Adam's step count (as torch keeps it, a 0-dim tensor) and its tensors
    (`exp_avg`, `exp_avg_sq` and, where training keeps a master copy, `fp32`), all of the parameter's shape."""

    step: torch.Tensor
    tensors: dict[str, torch.Tensor]


@dataclass
class OptimizerState:
    """Every parameter's state, whole: dense parameters by name, expert banks by name and global expert id."""

    layout: Layout  # where it was saved
    hyper: list[dict]  # each optimizer group's settings (lr, betas, weight decay, ...) as saved
    dense: dict[str, ParamState] = field(default_factory=dict)
    experts: dict[str, dict[int, ParamState]] = field(default_factory=dict)

    def add_bank(self, name: str, first_expert: int, bank: ParamState) -> None:
        """Stores a bank [L, ...] of experts first_expert .. first_expert + L - 1, one expert at a time."""
        per_expert = self.experts.setdefault(name, {})
        for i in range(next(iter(bank.tensors.values())).shape[0]):
            per_expert[first_expert + i] = ParamState(bank.step, {k: t[i] for k, t in bank.tensors.items()})

    def local(self, name: str, first_expert: int, num_local: int) -> ParamState | None:
        """The state of parameter `name` on a rank: a dense parameter whole, an expert bank's experts
        [first_expert, first_expert + num_local) stacked. None when nothing was saved for it."""
        if name in self.dense:
            return self.dense[name]
        per_expert = self.experts.get(name)
        if per_expert is None:
            return None
        wanted = range(first_expert, first_expert + num_local)
        missing = [e for e in wanted if e not in per_expert]
        if missing:
            raise UserError(f"checkpoint: no optimizer state for expert {missing[0]} of {name} "
                            f"(the checkpoint holds {len(per_expert)} experts)")  # fmt: skip
        states = [per_expert[e] for e in wanted]
        steps = {float(s.step) for s in states}
        if len(steps) > 1:
            raise UserError(f"checkpoint: the experts of {name} were saved at different Adam steps {sorted(steps)}")
        keys = states[0].tensors.keys()
        return ParamState(states[0].step, {k: torch.stack([s.tensors[k] for s in states]) for k in keys})


def read_optimizer_state(root: Path, tag: str, groups: list[list[str]] | None = None, trust: bool = False,
                         wanted_experts: set[int] | None = None) -> OptimizerState:  # fmt: skip
    """The optimizer state of `root/tag`, from its layout-free form when it has one (reading only the experts in
    `wanted_experts`, all when None), else from DeepSpeed's files. `groups` names the parameters of each optimizer
    group when the tag has no layout record (a ZeRO 0 tag saved before vimoe recorded it; the trainer passes its
    own, which a model of the same config has in the same order).

    Raises:
        UserError: naming the file, when one is missing, unreadable, or does not hold what its layout says.
    """
    tag_dir = Path(root) / tag
    states = load_file(tag_dir / MODEL_STATES, trust, mmap=True)
    layout = layout_from_states(states, tag_dir / MODEL_STATES)
    if (tag_dir / OPTIM_DIR / OPTIM_DENSE).is_file():
        return _read_layout_free(tag_dir / OPTIM_DIR, layout, trust, wanted_experts)
    if layout.zero_stage == 0:
        names = layout.groups or groups
        if names is None:
            raise UserError(f"checkpoint {str(tag_dir)!r}: saved without vimoe's layout record, the optimizer state "
                            "of its ZeRO 0 files cannot be matched to parameters")  # fmt: skip
        return _read_ep_files(tag_dir, layout, [list(g) for g in names], trust)
    return _read_zero_files(tag_dir, layout, states.get("param_shapes"), trust)


def _required(path: Path, layout: Layout, trust: bool) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint {str(path.parent)!r}: {path.name} is missing (saved at {layout.describe()})")
    return load_file(path, trust)


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"checkpoint file {str(path)!r}: {what}")


def _step(value) -> torch.Tensor:
    return value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value))


def _hyper(param_groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in param_groups]


def _read_ep_files(tag_dir: Path, layout: Layout, groups: list[list[str]], trust: bool) -> OptimizerState:
    """ZeRO 0: one torch optimizer state dict per expert-parallel rank (FP16_UnfusedOptimizer's around it under
    bf16, with the fp32 master copies); a dense model's is in the model states file."""
    out = OptimizerState(layout, [])
    files = [ep_optim_file(r) for r in range(layout.ep_size)] if layout.num_experts else [MODEL_STATES]
    for ep_rank, name in enumerate(files):
        path = tag_dir / name
        saved = _required(path, layout, trust).get("optimizer")
        if not isinstance(saved, dict):
            raise _bad(path, "holds no optimizer state")
        masters = saved.get("fp32_groups")
        torch_sd = saved.get("optimizer_state_dict") if masters is not None else saved
        if not isinstance(torch_sd, dict) or "state" not in torch_sd or "param_groups" not in torch_sd:
            raise _bad(path, f"an optimizer state of a kind vimoe cannot convert (keys {sorted(saved)[:6]})")
        if len(torch_sd["param_groups"]) != len(groups):
            raise _bad(path, f"{len(torch_sd['param_groups'])} optimizer groups, the layout names {len(groups)}")
        if ep_rank == 0:
            out.hyper = _hyper(torch_sd["param_groups"])
        for g, (group, names) in enumerate(zip(torch_sd["param_groups"], groups)):
            if len(group["params"]) != len(names):
                raise _bad(path, f"group {g} holds {len(group['params'])} parameters, the layout names {len(names)}")
            for j, (index, name) in enumerate(zip(group["params"], names)):
                expert = EXPERT_PARAM_RE.match(name) is not None
                state = torch_sd["state"].get(index)
                if (ep_rank > 0 and not expert) or not state:
                    continue  # dense parameters: the same on every rank; no state: never stepped
                tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
                if masters is not None:
                    tensors[FP32] = masters[g][j]
                param = ParamState(_step(state.get("step", 0)), tensors)
                if expert:
                    out.add_bank(name, ep_rank * tensors["exp_avg"].shape[0], param)
                else:
                    out.dense[name] = param
    return out


def _read_zero_files(tag_dir: Path, layout: Layout, shapes: list[dict] | None, trust: bool) -> OptimizerState:
    """ZeRO 1/2: one file per rank with a flat fp32 partition per group and DeepSpeed's map of its fragments."""
    if not shapes:
        raise _bad(tag_dir / MODEL_STATES, "no param_shapes (DeepSpeed writes them under ZeRO)")
    files, paths = [], []
    for rank in range(layout.world_size):
        path = tag_dir / zero_optim_file(rank, layout.precision == "bf16")
        osd = _required(path, layout, trust).get("optimizer_state_dict")
        if not isinstance(osd, dict) or not isinstance(osd.get("base_optimizer_state"), dict):
            raise _bad(path, "holds no rigid ZeRO optimizer state (elastic_checkpoint is not supported)")
        files.append(osd)
        paths.append(path)
    param_groups = files[0]["base_optimizer_state"]["param_groups"]
    out = OptimizerState(layout, _hyper(param_groups))
    if len(shapes) != len(param_groups):
        what = f"param_shapes of {len(shapes)} groups, the optimizer has {len(param_groups)}"
        raise _bad(tag_dir / MODEL_STATES, what)
    world, ep = layout.world_size, layout.ep_size
    for g, group in enumerate(param_groups):
        moe = bool(group.get("moe"))
        owners = [list(range(r, world, ep)) for r in range(ep)] if moe else [list(range(world))]
        for ep_rank, ranks in enumerate(owners):
            pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
            steps: dict[str, torch.Tensor] = {}
            for rank in ranks:
                osd, path = files[rank], paths[rank]
                if osd["partition_count"][g] != len(ranks):
                    raise _bad(path, f"group {g} is split over {osd['partition_count'][g]} ranks, its layout says "
                                     f"{len(ranks)} ({layout.describe()})")  # fmt: skip
                flat_master = osd["single_partition_of_fp32_groups"][g]
                base = osd["base_optimizer_state"]
                state = base["state"].get(base["param_groups"][g]["params"][0], {})
                flats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
                for name, where in osd["param_slice_mappings"][g].items():
                    pieces[name][FP32].append(flat_master.narrow(0, where.start, where.numel))
                    for key, flat in flats.items():
                        pieces[name][key].append(flat.narrow(0, where.start, where.numel))
                    if "step" in state:
                        steps[name] = _step(state["step"])
            for name, parts in pieces.items():
                shape = shapes[g].get(name)
                if shape is None:
                    raise _bad(paths[ranks[0]], f"parameter {name} is not among the saved param_shapes")
                tensors = {}
                for key, chunks in parts.items():
                    whole = torch.cat(chunks)
                    if whole.numel() != torch.Size(shape).numel():
                        raise _bad(paths[ranks[0]], f"the fragments of {name} cover {whole.numel()} of its "
                                                    f"{torch.Size(shape).numel()} values ({key})")  # fmt: skip
                    tensors[key] = whole.view(shape).clone()
                param = ParamState(steps.get(name, torch.tensor(0.0)), tensors)
                if moe:
                    out.add_bank(name, ep_rank * shape[0], param)
                else:
                    out.dense[name] = param
    return out


# --- the layout-free form


def moe_layer_ids(names) -> dict[str, int]:
    """Expert bank name prefix -> DeepSpeed's MoE layer id (`layer_{L}_expert_*` files): the order of the MoE
    layers in the model, that is, of their block numbers."""
    prefixes = {m.group(1) for n in names if (m := EXPERT_PARAM_RE.match(n))}

    def natural(text: str) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]

    return {p: i for i, p in enumerate(sorted(prefixes, key=natural))}


def _plain(param: ParamState) -> dict:
    return {"step": param.step, **param.tensors}


def _from_plain(entry: dict) -> ParamState:
    return ParamState(_step(entry["step"]), {k: v for k, v in entry.items() if k != "step"})


def write_layout_free(state: OptimizerState, tag_dir: Path) -> list[Path]:
    """Writes `tag_dir/vimoe_optim/` (dense.pt and one file per expert) through a temporary directory renamed into
    place, so that a tag has the whole of it or none; returns the files written."""
    final = Path(tag_dir) / OPTIM_DIR
    tmp = Path(tag_dir) / f".{OPTIM_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dense = {"layout": state.layout.record(), "hyper": state.hyper,
                 "params": {n: _plain(p) for n, p in state.dense.items()}}  # fmt: skip
        torch.save(dense, tmp / OPTIM_DENSE)
        layers = moe_layer_ids(state.experts)
        per_file: dict[tuple[int, int], dict] = defaultdict(dict)
        for name, per_expert in state.experts.items():
            layer = layers[EXPERT_PARAM_RE.match(name).group(1)]
            for expert, param in per_expert.items():
                per_file[(layer, expert)][name] = _plain(param)
        for (layer, expert), params in sorted(per_file.items()):
            torch.save(params, tmp / optim_expert_file(layer, expert))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(final.iterdir())


def _read_layout_free(folder: Path, layout: Layout, trust: bool, wanted: set[int] | None) -> OptimizerState:
    dense = load_file(folder / OPTIM_DENSE, trust)
    out = OptimizerState(layout, list(dense.get("hyper", [])))
    out.dense = {n: _from_plain(e) for n, e in dense.get("params", {}).items()}
    expected = {(layer, e) for layer in range(len(layout.num_experts)) for e in range(layout.num_experts[layer])}
    present = {(int(m.group(1)), int(m.group(2))) for f in folder.iterdir() if (m := OPTIM_EXPERT_RE.match(f.name))}
    for layer, expert in sorted(expected):
        if wanted is not None and expert not in wanted:
            continue
        if (layer, expert) not in present:
            raise UserError(f"checkpoint {str(folder)!r}: {optim_expert_file(layer, expert)} is missing "
                            f"(saved at {layout.describe()})")  # fmt: skip
        for name, entry in load_file(folder / optim_expert_file(layer, expert), trust).items():
            out.experts.setdefault(name, {})[expert] = _from_plain(entry)
    return out
