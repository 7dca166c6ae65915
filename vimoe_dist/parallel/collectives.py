"""The few collectives the trainer, the evaluation and the analysis use, over the default process group.

Each works in place and returns its tensor, and does nothing in a process without a process group (one rank: the
reduction of one value is the value). Backend differences live here: gloo has no AVG reduction, and NCCL reduces
GPU tensors only (a host tensor, such as the checkpoint's agreement flags, goes through the GPU and back).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MIN)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.SUM)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (gloo has no AVG: a sum divided by the world size there)."""
    if not is_initialized():
        return t
    if dist.get_backend() == "gloo":
        return _reduce(t, dist.ReduceOp.SUM).div_(dist.get_world_size())
    return _reduce(t, dist.ReduceOp.AVG)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when `flag` is set on any rank."""
    return bool(all_reduce_max(torch.tensor([float(flag)], device=device)).item())


def sum_to_host(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (reduced in place), returned on the CPU."""
    return all_reduce_sum(t).cpu()


def all_gather_object(obj: object) -> list:
    """Every rank's `obj`, in rank order."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not is_initialized():
        return t
    if dist.get_backend() == "nccl" and not t.is_cuda:
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=op)
        return t.copy_(buf)
    dist.all_reduce(t, op=op)
    return t
