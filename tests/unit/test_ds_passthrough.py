"""`parallel.deepspeed: {...}` is merged into the generated DeepSpeed config (parallel/ds_config.py); keys the trainer
owns are refused in one line naming the key and where it is set instead; `metrics.peak_tflops` is bounded. DeepSpeed
itself reading the merged config (its csv monitor writing into the run directory) is checked in a real run in
tests/multiproc/test_metrics_training.py."""

from __future__ import annotations

import pytest
import yaml

from vimoe_dist.config import DEEPSPEED_OWNED, ConfigError, load_config, save_config
from vimoe_dist.parallel.ds_config import MONITOR_DIR, build_ds_config


def ds(*overrides: str, world: int = 1) -> dict:
    return build_ds_config(load_config(None, ["train.global_batch_size=8", "run.out_dir=/runs/a", *overrides]), world)


def test_sections_pass_through_and_zero_optimization_merges_key_by_key():
    plain = ds("parallel.zero_stage=1")
    merged = ds(
        "parallel.zero_stage=1",
        "parallel.deepspeed={wandb: {enabled: true, project: p}, flops_profiler: {enabled: true, profile_step: 3},"
        " communication_data_type: fp32, zero_optimization: {reduce_bucket_size: 1000, overlap_comm: true}}",
    )
    assert merged["wandb"] == {"enabled": True, "project": "p"}
    assert merged["flops_profiler"] == {"enabled": True, "profile_step": 3}
    assert merged["communication_data_type"] == "fp32"
    zero = merged["zero_optimization"]
    assert zero["stage"] == 1 and zero["reduce_bucket_size"] == 1000 and zero["overlap_comm"] is True
    assert zero["allgather_bucket_size"] == plain["zero_optimization"]["allgather_bucket_size"]  # the trainer's kept
    owned = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    assert {k: merged[k] for k in owned} == {k: plain[k] for k in owned}


def test_file_monitors_write_into_the_run_directory_unless_told_otherwise():
    out = ds("parallel.deepspeed={tensorboard: {enabled: true}, csv_monitor: {enabled: true, output_path: /elsewhere}}")
    assert out["tensorboard"] == {"enabled": True, "output_path": f"/runs/a/{MONITOR_DIR}"}
    assert out["csv_monitor"]["output_path"] == "/elsewhere"
    assert "output_path" not in ds("parallel.deepspeed={tensorboard: {enabled: false}}")["tensorboard"]


def test_the_config_is_not_changed_by_building_from_it():
    cfg = load_config(None, ["parallel.deepspeed={tensorboard: {enabled: true}}"])
    build_ds_config(cfg, 1)
    assert cfg.parallel.deepspeed == {"tensorboard": {"enabled": True}}


@pytest.mark.parametrize("key", sorted(DEEPSPEED_OWNED))
def test_every_key_the_trainer_owns_is_one_line_naming_it(key):
    *sections, last = key.split(".")
    value: object = 1
    for name in reversed([*sections, last]):
        value = {name: value}
    flow = yaml.safe_dump(value, default_flow_style=True).strip()
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"parallel.deepspeed={flow}"])
    message = str(info.value)
    assert message.startswith(f"parallel.deepspeed.{key}: the trainer writes this DeepSpeed setting itself (from ")
    assert "\n" not in message and DEEPSPEED_OWNED[key] in message


def test_the_owned_keys_cover_what_the_issue_names():
    for key in ("train_batch_size", "zero_optimization.stage", "bf16", "fp16", "optimizer", "scheduler"):
        assert key in DEEPSPEED_OWNED
    assert set(DEEPSPEED_OWNED) & set(ds()) == set(DEEPSPEED_OWNED) - {
        "zero_optimization.stage", "zero_optimization.compute_grad_norm", "amp", "torch_autocast", "data_types",
        "optimizer", "scheduler", "elasticity", "checkpoint",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("parallel.deepspeed=3", "parallel.deepspeed: expected a mapping"),
        ("parallel.deepspeed={zero_optimization: 2}", "parallel.deepspeed.zero_optimization: expected a mapping"),
        ("parallel.deepspeed={tensorboard: {x: .inf}}", "parallel.deepspeed.tensorboard.x: must be a finite"),
        ("parallel.deepspeed={1: x}", "parallel.deepspeed: 1 is not a DeepSpeed config key"),
        ("parallel.deepspeed={a: [1, {2: 3}]}", "parallel.deepspeed.a[1]: 2 is not a DeepSpeed config key"),
        ("parallel.deepspeed={when: 2024-01-01}", "parallel.deepspeed.when: datetime.date(2024, 1, 1) is not a JSON"),
        ("metrics.peak_tflops=0", "metrics.peak_tflops: must be a finite number in (0, 1000000]"),
        ("metrics.peak_tflops=-5", "metrics.peak_tflops"),
        ("metrics.peak_tflops=2e6", "metrics.peak_tflops"),
        ("metrics.peak_tflops=fast", "metrics.peak_tflops: expected float or null"),
    ],
)
def test_bad_values_are_one_line(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_section_survives_config_yaml_and_base_overlays(tmp_path):
    overrides = ["parallel.deepspeed={csv_monitor: {enabled: true, job_name: j}}", "metrics.peak_tflops=312"]
    cfg = load_config(None, overrides)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    (tmp_path / "over.yaml").write_text("base: config.yaml\nparallel:\n  deepspeed:\n    csv_monitor: {job_name: k}\n")
    over = load_config(tmp_path / "over.yaml")
    assert over.parallel.deepspeed == {"csv_monitor": {"enabled": True, "job_name": "k"}}  # overlays merge
    assert over.metrics.peak_tflops == 312.0
