"""A short soak (`vimoe bench soak` with a tiny model, a few hundred steps on 2 ranks): after warm-up the resident
memory of each rank and of its DataLoader worker stays flat, and the Prometheus endpoints keep a fixed number of
series. The full 2,000-step run of the digits config is the benchmark (bench/results/soak.json, soak.png)."""

from __future__ import annotations

import argparse

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS = 250
LIMIT_MIB_PER_1K = 24.0  # a leak of 24 KiB per step; the short window is noisier than the full soak's 8


def test_short_soak_keeps_memory_flat(jobs, digits_dir, tmp_path):  # jobs: DeepSpeed's CPU op is built
    from vimoe_dist.bench.soak import soak, soak_arguments

    parser = argparse.ArgumentParser()
    soak_arguments(parser)
    args = parser.parse_args([
        "--steps", str(STEPS), "--log-every", "5", "--checkpoint-every", "100", "--warmup", "0.3",
        "--limit-mib-per-1k", str(LIMIT_MIB_PER_1K),
        "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
        "model.moe.group_size=4", "train.global_batch_size=16", "train.warmup_steps=10", "data.num_workers=1",
    ])  # fmt: skip
    result = soak(args, digits_dir, tmp_path / "run")
    # each rank and its DataLoader worker, sampled all along
    assert sorted(result["processes"]) == ["rank 0", "rank 0 data worker", "rank 1", "rank 1 data worker"], result
    for name, line in result["timeline"].items():  # from before the warm-up's end to near the last step
        steps = [step for step, training in zip(line["step"], line["training"]) if training]
        assert steps[0] <= STEPS * 0.3 and steps[-1] >= STEPS * 0.8, (name, steps)
    growth = {name: p["rss_mib_per_1k_steps"] for name, p in result["processes"].items()}
    assert result["flat"], growth
    # label sets stay bounded: at most a new event name or two, never a series per step
    for rank, counts in result["prometheus_series"].items():
        assert counts["max_after_warmup"] - counts["min_after_warmup"] <= 3, (rank, counts)
