"""What the trainer does once before the loop: the checks that need no process group, the run directory and what it
records (config, class names), logging and the start-up line, seeds, the loss, and the DeepSpeed engine around the
parallelized model."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from vimoe_dist.config import Config, micro_batch_size
from vimoe_dist.data.check import DataSummary
from vimoe_dist.errors import UserError
from vimoe_dist.parallel.device import describe_device
from vimoe_dist.parallel.ds_config import build_ds_config
from vimoe_dist.parallel.engine import initialize
from vimoe_dist.parallel.env import DistEnv
from vimoe_dist.train.optim import build_optimizer, build_scheduler


def prepare_run_dir(cfg: Config, rank: int) -> Path:
    """Creates the run directory; both it and `checkpoints/` (often a mount of its own) must take a file. Its
    `config.yaml` is written later, once the checkpoint to resume is accepted (train/rundir.py)."""
    run_dir = Path(cfg.run.out_dir)
    for where in (run_dir, run_dir / "checkpoints"):
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = where / f".write_test_{rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run.out_dir: cannot write to {str(where)!r} ({e.strerror or e})") from None
    return run_dir


def announce(cfg: Config, env: DistEnv, device: torch.device, backend: str, data: DataSummary) -> None:
    """Rank 0 states the job in one line (`startup_line`)."""
    if env.is_main:
        logging.getLogger("vimoe.train").info("%s", startup_line(cfg, env, device, backend, data))


def startup_line(cfg: Config, env: DistEnv, device: torch.device, backend: str, data: DataSummary) -> str:
    """Rank 0's one line on what this job is: where it computes, how it is split over ranks, and on what data."""
    p, moe, world = cfg.parallel, cfg.model.moe, env.world_size
    micro = micro_batch_size(cfg, world)
    nodes = f" on {env.num_nodes} nodes" if env.num_nodes > 1 else ""
    ranks = f"{world} ranks" if world > 1 else "1 rank"
    return (
        f"start: device {describe_device(device)}, backend {backend}, precision {p.precision}, {ranks}{nodes}, "
        f"ep_size {p.ep_size} ({moe.num_experts // p.ep_size} of {moe.num_experts} experts per rank), "
        f"{cfg.train.global_batch_size // world} images per rank per step (micro-batch {micro}, "
        f"{micro // moe.group_size} routing groups of {moe.group_size}); {data.describe()}"
    )


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seeds every generator before the model is built: every rank starts from the same initial weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_criterion(cfg: Config) -> nn.Module:
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        return SoftTargetCrossEntropy()  # targets already carry label smoothing (timm Mixup)
    if cfg.train.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.train.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def build_engine(model: nn.Module, cfg: Config, world: int, run_dir: Path | None = None):
    """Our optimizer and schedule, and the DeepSpeed engine around the parallelized `model`; the DeepSpeed config is
    written to `run_dir` when given (rank 0). Returns (engine, optimizer, scheduler)."""
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    ds_config = build_ds_config(cfg, world)
    if run_dir is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    return initialize(model, optimizer, ds_config), optimizer, scheduler
