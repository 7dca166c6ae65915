"""Loading a checkpoint's optimizer state (parallel/optim_state.py: per parameter, whole) into a run at another
layout: every rank takes the state of its own parameters (its experts' slice of each expert bank) and puts it where
its optimizer keeps it.

    torch    (ZeRO 0, fp32)  our AdamW's per-parameter state; the weights are the master copy
    unfused  (ZeRO 0, bf16)  DeepSpeed's FP16_UnfusedOptimizer: an fp32 master per parameter and AdamW's state of it
    zero     (ZeRO 1/2)      the fragment of each parameter in this rank's flat fp32 partition, through DeepSpeed's
                             tensor-fragment API (`safe_set_full_fp32_param`, the fragments' `optim_fragment` and
                             `map_to_flat_opt_states`), the way DeepSpeed's own universal-checkpoint loader fills it

Called after `engine.load_checkpoint(..., load_optimizer_states=False)` has loaded the weights (which restores ZeRO's
fp32 partitions from them); no collective.
"""

from __future__ import annotations

import torch

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.checkpoint_layout import EXPERT_PARAM_RE
from vimoe_dist.parallel.groups import expert_parallel_rank
from vimoe_dist.parallel.layout import ZERO_GROUP_ATTRS, Layout, optimizer_groups
from vimoe_dist.parallel.optim_state import FP32, OptimizerState, ParamState


def load_optimizer_state(engine, state: OptimizerState, here: Layout, where: str) -> int:
    """Puts `state` into the engine's optimizer (see the module docstring); returns the number of parameters that
    got a state. `here` is the run's layout, `where` names the checkpoint in errors.

    Raises:
        UserError: naming both layouts, when the saved state does not fit this run's parameters.
    """
    kind, groups = optimizer_groups(engine.optimizer)
    names = {p: n for n, p in engine.module.named_parameters()}
    first_expert = expert_parallel_rank(here.ep_size) * here.experts_per_rank
    both = f"saved at {state.layout.describe()}; this run: {here.describe()}"
    if len(groups) != len(state.hyper):
        raise UserError(f"checkpoint {where}: {len(state.hyper)} optimizer groups saved, {len(groups)} here ({both})")
    loaded = 0
    for g, params in enumerate(groups):
        found: dict[torch.nn.Parameter, ParamState] = {}
        for p in params:
            name = names[p]
            param = state.local(name, first_expert, p.shape[0] if EXPERT_PARAM_RE.match(name) else 0)
            if param is None:
                continue  # no state saved: the parameter was never stepped, nor would it have been here
            bad = next((k for k, t in param.tensors.items() if t.shape != p.shape), None)
            if bad is not None:
                shape = list(param.tensors[bad].shape)
                raise UserError(f"checkpoint {where}: the optimizer state of {name} is {shape}, the parameter "
                                f"{list(p.shape)} ({both})")  # fmt: skip
            found[p] = param
        {"torch": _into_torch, "unfused": _into_unfused, "zero": _into_zero}[kind](engine.optimizer, g, params, found)
        loaded += len(found)
    # the learning rate the saved run had (our schedule sets it again after every step)
    base = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else engine.optimizer.optimizer
    for group, saved in zip(base.param_groups, state.hyper):
        if "lr" in saved:
            group["lr"] = saved["lr"]
    return loaded


def _adam_state(param: ParamState, like: torch.Tensor) -> dict:
    """torch AdamW's state of one tensor: the step as torch keeps it (a 0-dim float32 tensor) and the moments."""
    moments = {k: t.to(like.device, like.dtype) for k, t in param.tensors.items() if k != FP32}
    return {"step": param.step.detach().clone().float().cpu(), **moments}


def _into_torch(optimizer, g: int, params: list, found: dict) -> None:
    for p in params:
        if p in found:
            if FP32 in found[p].tensors:  # the weights are the master copy: a bf16 run's fp32 master replaces them
                p.data.copy_(found[p].tensors[FP32])
            optimizer.state[p] = _adam_state(found[p], p)


def _into_unfused(optimizer, g: int, params: list, found: dict) -> None:
    for p, master in zip(params, optimizer.fp32_groups[g]):
        # without optimizer states DeepSpeed leaves the masters as they were built: from the loaded weights, or saved
        master.data.copy_(found[p].tensors[FP32] if p in found and FP32 in found[p].tensors else p.data)
        if p in found:
            optimizer.optimizer.state[master] = _adam_state(found[p], master)


def _into_zero(optimizer, g: int, params: list, found: dict) -> None:
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states, safe_set_full_fp32_param

    flat = next(getattr(optimizer, hp)[g] for lp, hp in ZERO_GROUP_ATTRS if hasattr(optimizer, lp))
    mine = [p for p in params if getattr(p, "_hp_mapping", None) is not None]  # parameters with a fragment here
    keys = sorted({k for p in mine if p in found for k in found[p].tensors if k != FP32})
    steps = {float(found[p].step) for p in mine if p in found}
    if len(steps) > 1:
        raise UserError(f"checkpoint: the parameters of optimizer group {g} were saved at different steps {steps}")
    for p in mine:
        fragment = p._hp_mapping.lp_fragment_address
        saved = found.get(p)
        if saved is not None and FP32 in saved.tensors:
            safe_set_full_fp32_param(p, saved.tensors[FP32].to(flat.device, flat.dtype))
        p._hp_mapping.optim_fragment = {
            k: (saved.tensors[k].flatten().narrow(0, fragment.start, fragment.numel).to(flat.device, flat.dtype)
                if saved is not None and k in saved.tensors else torch.zeros(fragment.numel, dtype=flat.dtype,
                                                                             device=flat.device))
            for k in keys
        }  # fmt: skip
    if keys:  # a partition of padding alone has nothing to carry, and its Adam state starts when it steps
        map_to_flat_opt_states(flat, mine, optimizer.optimizer.state, keys)
        optimizer.optimizer.state[flat]["step"] = torch.tensor(steps.pop())
