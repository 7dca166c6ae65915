"""metrics.jsonl and the console progress of rank 0, driven by a small fake training loop."""

from __future__ import annotations

import io
import json
import logging

import pytest

from vimoe_dist.config import ConfigError, load_config
from vimoe_dist.metrics import build_metrics
from vimoe_dist.metrics.jsonl import JsonlSink, read_jsonl
from vimoe_dist.metrics.progress import ProgressSink


def strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


MOE = {"tokens": [4, 4, 8, 0], "dropped": 1, "entropy": 1.3, "imbalance": 2.0}


def run(metrics, first: int, last: int, log_every: int = 5) -> None:
    for step in range(first, last + 1):
        metrics.on_step(step, images=8, step_seconds=0.05, data_wait_seconds=0.01, alltoall_seconds=0.0)
        if step % log_every == 0:
            metrics.on_log(
                {
                    "step": step, "loss": float("nan") if step == 10 else 1.0 / step, "lr": 1e-3,
                    "images_per_sec": 160.0, "grad_norm": 0.3, "step_seconds": 0.05, "data_wait_seconds": 0.01,
                    "bad_samples": 0, "moe": {"5": dict(MOE)},
                }
            )  # fmt: skip


def test_rank0_writes_jsonl_records_of_every_kind(tmp_path):
    cfg = load_config(None, ["train.progress=false"])
    metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=2, run_dir=tmp_path, total_steps=20)
    run(metrics, 1, 20)
    metrics.on_eval({"step": 20, "eval_top1": 0.625, "eval_top5": 0.9, "eval_loss": 1.2, "images": 400})
    metrics.on_checkpoint(20, 0.7)
    metrics.on_event("expert_collapse", step=20, layer=5, share=0.9)
    metrics.close()
    metrics.close()  # closing twice is harmless

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for r in train:
        assert {"step", "loss", "lr", "images_per_sec", "grad_norm", "time"} <= set(r)
        assert r["moe"] == {"5": MOE}
    assert train[1]["loss"] is None  # NaN is written as null
    (evals,) = [r for r in records if "eval_top1" in r]
    assert evals == {**evals, "step": 20, "eval_top1": 0.625, "eval_top5": 0.9, "eval_images": 400}
    (event,) = [r for r in records if "event" in r]
    assert event["event"] == "expert_collapse" and event["step"] == 20 and event["layer"] == 5
    assert any(r.get("checkpoint_seconds") == 0.7 for r in records)


def test_other_ranks_write_no_file_and_show_nothing(tmp_path, capsys):
    cfg = load_config(None, [])
    metrics = build_metrics(cfg, rank=1, local_rank=1, world_size=2, run_dir=tmp_path, total_steps=20)
    run(metrics, 1, 10)
    metrics.on_event("bad_step", step=10)
    metrics.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert capsys.readouterr().err == ""


def test_resume_drops_the_lines_of_the_redone_steps(tmp_path):
    sink = JsonlSink(tmp_path)
    for step in (5, 10, 15, 20):
        sink.on_log({"step": step, "loss": 1.0, "lr": 0.1, "images_per_sec": 1.0})
    sink.on_eval({"step": 10, "eval_top1": 0.5})
    sink.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "loss": 0.')  # torn by a crash
    sink = JsonlSink(tmp_path, start_step=10)  # the last checkpoint was at step 10
    sink.on_log({"step": 15, "loss": 0.9, "lr": 0.1, "images_per_sec": 1.0})
    sink.close()
    steps = [(r["step"], r.get("loss"), "eval_top1" in r) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [(5, 1.0, False), (10, 1.0, False), (10, None, True), (15, 0.9, False)]


def test_progress_lines_without_a_terminal():
    out = io.StringIO()
    sink = ProgressSink(total_steps=20, start_step=10, stream=out)
    for step in range(11, 16):
        sink.on_step(step, 8, 0.05, 0.0, 0.0)
    sink.on_log({"step": 15, "loss": 0.123456, "lr": 3e-4, "images_per_sec": 512.4})
    sink.on_eval({"step": 15, "eval_top1": 0.5, "eval_loss": 1.0})
    sink.on_event("bad_step", step=15)
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 15/20 loss 0.1235 lr 3.0e-04 img/s 512 eta ")
    assert lines[1] == "eval @ step 15: top1 0.5 loss 1" and lines[2] == "warning: bad_step step=15"
    assert "\r" not in out.getvalue()


def test_progress_lines_show_flops_mfu_and_gpu_memory_when_the_record_has_them():
    out = io.StringIO()
    sink = ProgressSink(total_steps=20, start_step=0, stream=out)
    record = {"step": 5, "loss": 0.5, "lr": 1e-3, "images_per_sec": 99.0, "tokens_per_sec": 1683.0}
    sink.on_log({**record, "achieved_tflops": 96.24, "mfu": 0.0973, "gpu_peak_allocated_bytes": 31.4 * 2**30})
    sink.on_log({**record, "step": 10, "achieved_tflops": 0.000123})  # a CPU run: no MFU without a peak, no GPU
    sink.close()
    first, second = out.getvalue().splitlines()
    assert first.startswith("step 5/20 loss 0.5 lr 1.0e-03 img/s 99 tflop/s 96.2 mfu 9.7% mem 31.4GiB eta ")
    assert second.startswith("step 10/20 loss 0.5 lr 1.0e-03 img/s 99 tflop/s 0.000123 eta ")


def test_progress_bar_on_a_terminal_shows_steps_loss_speed_and_eta():
    out = io.StringIO()
    sink = ProgressSink(total_steps=20, start_step=0, stream=out, bar=True)
    for step in range(1, 21):
        sink.on_step(step, 8, 0.05, 0.0, 0.0)
        if step % 10 == 0:
            sink.on_log({"step": step, "loss": 0.5, "lr": 1e-3, "images_per_sec": 99.0})
    sink._bar.refresh()
    text = out.getvalue()
    sink.close()
    assert "20/20" in text and "loss 0.5" in text and "img/s 99" in text and "<" in text  # tqdm's ETA is "<00:00"


def test_pushgateway_down_is_a_warning_not_a_failure(tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, [f"metrics.pushgateway=http://127.0.0.1:{port}", "metrics.push_timeout_s=2"])
    metrics = build_metrics(
        cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1, stream=io.StringIO()
    )
    metrics.on_step(1, images=1, step_seconds=0.1)
    with caplog.at_level(logging.WARNING):
        metrics.close()
    assert any("metrics.pushgateway" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("metrics.port=70000", "metrics.port"),
        ("metrics.port=-1", "metrics.port"),
        ("metrics.addr=''", "metrics.addr"),
        ("metrics.job=' '", "metrics.job"),
        ("metrics.pushgateway=ftp://gw:9091", "metrics.pushgateway"),
        ("metrics.pushgateway=''", "metrics.pushgateway"),
        ("metrics.push_timeout_s=0", "metrics.push_timeout_s"),
        ("metrics.port_search=maybe", "metrics.port_search"),
    ],
)
def test_bad_metrics_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_good_metrics_config():
    cfg = load_config(None, ["metrics.pushgateway=gw:9091", "metrics.addr=0.0.0.0", "metrics.port_search=true"])
    assert cfg.metrics.pushgateway == "gw:9091" and cfg.metrics.port_search is True
