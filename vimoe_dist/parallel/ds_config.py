"""The DeepSpeed config, generated from ours in one function and written next to the run.

`parallel.deepspeed: {...}` is merged into it: DeepSpeed's own settings that the trainer leaves alone pass through,
such as its monitors (`tensorboard`, `wandb`, `csv_monitor`, `comet`: they log DeepSpeed's loss, learning rate and
loss scale from rank 0), `flops_profiler`, `communication_data_type`, `wall_clock_breakdown` or ZeRO's bucket sizes
(`zero_optimization: {reduce_bucket_size: ...}`). Keys the trainer owns (batch sizes, ZeRO stage, precision,
optimizer, scheduler, clipping: `vimoe_dist.config.DEEPSPEED_OWNED`) are refused in one line when the config is
loaded. A monitor without an `output_path` writes under `RUN/deepspeed_monitor/` rather than the working directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from vimoe_dist.config import Config, micro_batch_size

MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")
MONITOR_DIR = "deepspeed_monitor"
_PATH_MONITORS = ("tensorboard", "csv_monitor")  # the monitors that write files to an `output_path`


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """Batch sizes, ZeRO stage, precision and clipping for `deepspeed.initialize`, with `parallel.deepspeed` merged in.

    The optimizer and the schedule are ours (AdamW with weight-decay and layer-decay groups, timm's cosine schedule)
    and are passed to DeepSpeed as objects, so they are absent here.
    """
    t, p = cfg.train, cfg.parallel
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,  # our own logging; DeepSpeed's would print on every rank
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if p.zero_stage > 0:
        ds["zero_optimization"].update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
                "allgather_bucket_size": 5e7,
            }
        )
    extra = copy.deepcopy(p.deepspeed)
    for name in _PATH_MONITORS:
        section = extra.get(name)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(Path(cfg.run.out_dir) / MONITOR_DIR)
    merge(ds, extra)
    return ds


def merge(dst: dict, src: dict[str, Any]) -> dict:
    """`src` into `dst`, section by section: mappings on both sides merge, anything else from `src` wins. (Config
    validation has already refused the keys the trainer owns.)"""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            merge(dst[key], value)
        else:
            dst[key] = value
    return dst
