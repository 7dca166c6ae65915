"""`grad_norm` of the log record: the global L2 norm of the gradients before clipping, in every precision and ZeRO
stage.

DeepSpeed reports one (`engine.get_global_grad_norm()`) from its ZeRO 1/2 optimizers, which count every gradient.
Elsewhere the norm is computed here: in fp32 ZeRO-0 our AdamW steps directly and DeepSpeed keeps no norm (it clips
through one it does not keep); in bf16 and fp16 ZeRO-0 it wraps our AdamW in its `FP16_UnfusedOptimizer`, whose norm
sums the shared parameters only and leaves every expert gradient out (deepspeed/runtime/fp16/unfused_optimizer.py,
`step`). The norm is taken after the backward of a step's last micro-batch, when DeepSpeed has reduced the gradients
and before its `step()` unscales (fp16) and clips them: the loss scale is divided out here, and clipping is left as
it is (this only measures).

Under expert parallelism the dense gradients are the same on every rank after the reduction, and each expert's
gradient is the same on the ranks that hold that expert (one per expert-parallel group): the norm counts every
gradient once, ||g||^2 = ||g_dense||^2 + (sum over all ranks of ||g_local experts||^2) / (world / ep_size), so it
is the norm of the whole model's gradient, whatever the layout (one all-reduce of one number). It is computed only
at the steps that are logged.
"""

from __future__ import annotations

import torch
from torch import nn

from vimoe_dist.parallel.collectives import all_reduce_sum

# DeepSpeed optimizers (by class name: DeepSpeed is imported in parallel/ only) whose norm leaves the experts out
NORM_WITHOUT_EXPERTS = ("FP16_UnfusedOptimizer",)


class GradNorm:
    """The gradient norm of the last logged step.

    Args:
        engine: the DeepSpeed engine.
        model: the model inside it.
        world_size: ranks in the job.
        ep_size: `parallel.ep_size`.
    """

    def __init__(self, engine, model: nn.Module, world_size: int, ep_size: int) -> None:
        self.engine = engine
        optimizer = engine.optimizer
        self.own = not hasattr(optimizer, "_global_grad_norm") or type(optimizer).__name__ in NORM_WITHOUT_EXPERTS
        params = [p for p in model.parameters() if p.requires_grad]
        self.dense = [p for p in params if getattr(p, "allreduce", True)]
        self.experts = [p for p in params if not getattr(p, "allreduce", True)]  # tagged by `parallelize`
        self.replicas = world_size // ep_size  # ranks that hold the same expert
        self.value: torch.Tensor | None = None

    def capture(self) -> None:
        """After the backward of a logged step's last micro-batch, before `engine.step()` (a collective when the
        norm is ours: every rank calls it at the same steps)."""
        if self.own:
            self.value = global_grad_norm(self.dense, self.experts, self.replicas) / self._loss_scale()

    def _loss_scale(self) -> float:
        """The factor fp16's loss scaling left in the gradients (1 elsewhere)."""
        config = getattr(self.engine.optimizer, "loss_scale_config", None)
        return float(config.cur_scale) if getattr(config, "use_grad_scaling", False) else 1.0

    def take(self) -> float | None:
        """The norm of the last step before the log (None before any step was applied)."""
        if not self.own:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        value, self.value = self.value, None
        return value.item() if value is not None else None


def global_grad_norm(dense: list[nn.Parameter], experts: list[nn.Parameter], replicas: int) -> torch.Tensor:
    """sqrt(||dense grads||^2 + sum over ranks of ||local expert grads||^2 / replicas), in float64 (module
    docstring); parameters without a gradient count as zero."""
    device = next((p.device for p in (*dense, *experts)), torch.device("cpu"))
    total = _squared_norm(dense, device)
    if experts:  # the same on every rank (one model): a dense model makes no collective
        total = total + all_reduce_sum(_squared_norm(experts, device).view(1)).view(()) / replicas
    return total.sqrt()


def _squared_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # per tensor in fp32 at least (bf16 gradients would round their norms), summed in fp64
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
    return torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()
