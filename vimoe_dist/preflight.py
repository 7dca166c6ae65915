"""The checks `vimoe train` makes before it builds the model, in one function that needs no process group and no
model, so that the trainer (before its rendezvous), `vimoe launch` (before any rank starts, `--dry-run` included) and
`vimoe config show` (on a login node, before an allocation is spent) run the same ones.

In order: `check_config` (training data configured, the pretrained file exists, fp16 not on a CPU run), the
devices where the caller knows them (the rank's own device; the ranks a local launch starts here; the GPUs a Slurm
job gets per node: parallel/device.py), `check_layout` for the world size (ep_size, batch split, routing groups),
and the data of both splits (`vimoe_dist.data.check_data`: shards exist and match their manifests, labels
fit `model.num_classes`, the splits' class lists agree, sizes from the manifests). A new pre-build check belongs
here: every caller then runs it with no further change. Importing this module imports no torch (a login node's
`vimoe launch slurm` stays quick); the device checks import it when they run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vimoe_dist.config import Config, ConfigError, check_layout
from vimoe_dist.data.check import DataSummary, SplitSummary, check_data

if TYPE_CHECKING:  # torch is imported where a device is checked: `vimoe config show` needs none
    import torch

log = logging.getLogger("vimoe.preflight")


@dataclass
class PreflightReport:
    world_size: int | None  # None: the launcher cannot know it (hostfile with --include/--exclude)
    data: DataSummary | None  # what the data checks learnt without reading a shard; None: data not checked here
    device: str | None = None  # the device type the ranks started here use; None: not checked here

    @property
    def train(self) -> SplitSummary:
        assert self.data is not None, "data checks were skipped"
        return self.data.train

    @property
    def val(self) -> SplitSummary | None:  # None: no data.val
        assert self.data is not None, "data checks were skipped"
        return self.data.val


def preflight(
    cfg: Config,
    world_size: int | None,
    *,
    device: torch.device | None = None,
    local_ranks: int | None = None,
    gpus_per_node: int | None = None,
    data: bool = True,
) -> PreflightReport:
    """Runs every check `vimoe train` makes before it builds the model, for a job of `world_size` ranks.

    Args:
        device: the device of the calling rank (the trainer): backend and precision must fit it.
        local_ranks: ranks a launcher starts on this machine: `run.device` is resolved here for the last of them.
        gpus_per_node: GPUs a Slurm job gets on each node: `run.device: cuda` (or fp16, or NCCL) needs some.
        data: False leaves the data checks to the ranks (data on node-local disks, not visible here).

    Raises:
        UserError: the first check that fails (a `ConfigError` for a bad key or value), in one line naming the key.
    """
    check_config(cfg)
    if local_ranks is not None and device is None:
        from vimoe_dist.parallel.device import resolve_device

        device = resolve_device(cfg.run.device, max(local_ranks - 1, 0))  # the last local rank needs its own GPU
    if device is not None:
        check_device(cfg, device)
    if gpus_per_node is not None:
        _check_allocation(cfg, gpus_per_node)
    if world_size is not None:
        check_layout(cfg, world_size)
    summary = check_data(cfg) if data else None
    return PreflightReport(world_size, summary, device.type if device is not None else None)


def check_config(cfg: Config) -> None:
    """Checks that need no process group, no device and no data (build_model makes the same file check later)."""
    if cfg.data.train is None:
        raise ConfigError("data.train: no training shards configured")
    source = cfg.model.pretrained
    looks_like_file = source is not None and ("/" in source or source.endswith((".pth", ".pt", ".bin", ".safetensors")))
    if looks_like_file and not Path(source).exists():
        raise ConfigError(f"model.pretrained: file {source!r} does not exist")
    if cfg.parallel.precision == "fp16" and cfg.run.device == "cpu":  # under auto, checked with the device
        raise ConfigError("parallel.precision: fp16 needs a CUDA device (run.device: cpu); use bf16 or fp32 on CPU")


def check_device(cfg: Config, device: torch.device) -> str:
    """Backend and precision must go with the ranks' `device`; returns the backend (parallel/init.py)."""
    from vimoe_dist.parallel.init import resolve_backend

    backend = resolve_backend(cfg.parallel.backend, device)
    if cfg.parallel.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"parallel.precision: fp16 needs a CUDA device, and the ranks run on the {device.type} (run.device); "
            "use bf16 or fp32 there"
        )
    return backend


def _check_allocation(cfg: Config, gpus_per_node: int) -> None:
    """What a Slurm job's `--gpus-per-node` decides before any node is known."""
    p = cfg.parallel
    if gpus_per_node == 0:
        for needs_gpu, what in (
            (cfg.run.device == "cuda", "run.device: cuda"),
            (p.precision == "fp16", "parallel.precision: fp16"),
            (p.backend == "nccl", "parallel.backend: nccl"),
        ):
            if needs_gpu:
                raise ConfigError(f"{what} needs GPUs, but --gpus-per-node 0 gives the job none")
    elif cfg.run.device == "cpu":
        log.warning("run.device: cpu: the job's %d GPUs per node stay idle", gpus_per_node)
