"""The DeepSpeed config, generated from ours in one function and written next to the run."""

from __future__ import annotations

from vimoe_dist.config import Config, micro_batch_size


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """Batch sizes, ZeRO stage, precision and clipping for `deepspeed.initialize`.

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
    return ds
