"""The benchmark harness itself (not the speeds): paired ratios, and `vimoe bench moe` end to end at toy sizes so the
benchmark cannot rot between the runs that fill the README's table."""

from __future__ import annotations

import json

import pytest

from vimoe_dist.bench.timing import interleaved_samples, paired_ratio
from vimoe_dist.cli import build_parser


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # round 2 ran on a machine 4x as slow for both variants and round 3 had a hiccup in the denominator: the median
    # of per-round ratios is 2, the ratio of the medians would be 3 / 4
    assert paired_ratio([2.0, 8.0, 3.0], [1.0, 4.0, 4.0]) == 2.0
    assert paired_ratio([1.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_interleaved_samples_run_every_variant_once_per_round_after_warmup():
    calls = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b")}
    samples = interleaved_samples(variants, rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warmup of each, then round-robin
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}


def test_bench_moe_runs_every_variant_at_toy_sizes(tmp_path, capsys):
    out = tmp_path / "moe.json"
    argv = ["bench", "moe", "--dim", "16", "--hidden", "32", "--experts", "4", "--images", "8", "--tokens", "5",
            "--group-size", "4", "--rounds", "1", "--out", str(out)]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    from vimoe_dist.model.moe.routers import ROUTERS

    assert {f"vimoe {name}" for name in ROUTERS} <= set(rows)
    assert {"dense x1", "dense x2", "deepspeed k1", "deepspeed k2", "fairscale k2"} <= set(rows)
    # dropless routing processes exactly k x T rows: the like-for-like comparison with the k x dense baseline
    assert rows["vimoe tc-softmax dropless k2"]["expert_rows"] == 2 * 8 * 5
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows["vimoe tc-softmax"]["ratio_vs_dense"] > 0 and rows["vimoe tc-softmax"]["speedup_vs_deepspeed"] > 0
    assert "ratio_vs_dense" in capsys.readouterr().out


def test_the_resume_cost_is_measured_and_scaled_to_imagenet_as_documented(tmp_path):
    """`vimoe bench data`'s resume figures: the header rate is measured on real shards, a resume deep into a run
    reaches its first batch in the exact order, and the ImageNet estimates follow from the measured rate (the
    stream's skip grows with the step, the exact order's does not)."""
    from vimoe_dist.bench.data import IMAGENET, resume_cost
    from vimoe_dist.data.digits import write_digits

    write_digits(tmp_path)
    r = resume_cost(tmp_path, images_per_sec=1000.0, rounds=1)
    rate, imagenet = r["header_rate_per_sec"], r["imagenet"]
    assert rate > 0 and r["imagenet_epoch_permutation_sec"] > 0
    assert set(r["first_batch_sec_after_resume_at_step"]) == {"0", "1000000"}
    per_worker = IMAGENET["step"] * IMAGENET["global_batch"] / (IMAGENET["ranks"] * IMAGENET["workers"])
    assert imagenet["stream_skip_samples_per_worker"] == per_worker
    assert imagenet["stream_skip_resume_sec"] == pytest.approx(per_worker * IMAGENET["members_per_sample"] / rate)
    assert 0 < imagenet["shards_touched_by_a_micro_batch"] <= IMAGENET["shards"]
    assert imagenet["exact_resume_sec"] > r["imagenet_epoch_permutation_sec"]
