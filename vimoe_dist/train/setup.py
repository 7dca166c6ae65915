"""What the trainer does once before the loop: the checks that need no process group, the run directory, logging,
seeds, the loss, and the DeepSpeed engine around the parallelized model."""

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

from vimoe_dist.config import Config, ConfigError
from vimoe_dist.errors import UserError
from vimoe_dist.parallel.ds_config import build_ds_config
from vimoe_dist.parallel.engine import initialize
from vimoe_dist.train.optim import build_optimizer, build_scheduler


def check_config(cfg: Config) -> None:
    """Checks that need no process group, before anything starts (build_model makes the same file check later)."""
    if cfg.data.train is None:
        raise ConfigError("data.train: no training shards configured")
    source = cfg.model.pretrained
    looks_like_file = source is not None and ("/" in source or source.endswith((".pth", ".pt", ".bin", ".safetensors")))
    if looks_like_file and not Path(source).exists():
        raise ConfigError(f"model.pretrained: file {source!r} does not exist")
    if cfg.parallel.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("parallel.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")


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
