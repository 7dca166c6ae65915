"""What the training step and the step-boundary actions share, built once by `train` (train/loop.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vimoe_dist.config import Config
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.parallel.env import DistEnv
from vimoe_dist.train.efficiency import Efficiency
from vimoe_dist.train.fault_hooks import FaultHooks
from vimoe_dist.train.grad_norm import GradNorm
from vimoe_dist.train.monitor import RoutingMonitor
from vimoe_dist.train.nonfinite import NonFiniteWatch
from vimoe_dist.train.signals import StopRequest

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Job:
    """One rank's training job: its config and place, the engine, data, metrics and watchers; the FLOP counter and
    the gradient norm of the log records are derived from the engine here."""

    cfg: Config
    env: DistEnv
    run_dir: Path
    engine: Any  # deepspeed's engine around the parallelized model (parallel/engine.py)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm's CosineLRScheduler, stepped per optimizer step
    criterion: nn.Module
    train_loader: Any
    val_loader: Any | None
    metrics: Any  # the metrics sinks (vimoe_dist.metrics)
    monitor: RoutingMonitor
    hooks: FaultHooks
    stop: StopRequest
    device: torch.device  # run.device resolved for this rank (parallel/device.py)
    nonfinite: NonFiniteWatch
    finite_steps: int = 0  # steps of this job whose loss was finite (train/boundary.py: none, nothing is saved)
    first_bad: str = ""  # where the first non-finite loss of this job came from, for the error when no step was finite
    efficiency: Efficiency = field(init=False)
    grad_norm: GradNorm = field(init=False)

    def __post_init__(self) -> None:
        model = unwrap(self.engine)
        self.efficiency = Efficiency(self.cfg, model, self.monitor.layers, self.device, self.env.is_main)
        self.grad_norm = GradNorm(self.engine, model, self.env.world_size, self.cfg.parallel.ep_size)

    def logs_at(self, step: int) -> bool:
        """Whether step `step` ends with a log record (`train.log_every`, and the last step)."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.parallel.precision]
