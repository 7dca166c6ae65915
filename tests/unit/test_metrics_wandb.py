"""`metrics.wandb`: a real W&B run in offline mode (no network), read back from its `.wandb` file.

wandb 0.31 no longer ships a Python reader for `.wandb` files (its `wandb.sdk.internal.datastore` is gone; the Go
core writes them), so `records` below undoes the file's framing (LevelDB's log format behind a 7-byte W&B header,
CRC-checked) and decodes each record with wandb's own protobuf schema (`wandb.proto.wandb_internal_pb2.Record`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from vimoe_dist.config import ConfigError, load_config
from vimoe_dist.errors import UserError
from vimoe_dist.metrics import build_metrics
from vimoe_dist.metrics.build import check_trackers

pytest.importorskip("wandb", reason="the wandb extra: pip install 'vimoe-dist[wandb]'")
from google.protobuf.message import DecodeError  # wandb's dependency, so present wherever wandb is
from support import unset_env

BLOCK = 32768  # LevelDB log blocks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The protobuf records of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at {pos}"
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished(path: Path, timeout: float = 60.0) -> list:
    """The records of a run's `.wandb` file once W&B's core process has written its end (`run.finish()` can return
    a moment before the core process has flushed the file)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(AssertionError, DecodeError):  # not yet written, or written up to a torn record
            found = list(records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in found):
                return found
        if time.monotonic() > deadline:
            pytest.fail(f"{path}: no exit record after {timeout:.0f} s")
        time.sleep(0.1)


def history(path: Path) -> list[dict]:
    rows = []
    for r in finished(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def run_record(path: Path):
    (run,) = [r.run for r in finished(path) if r.WhichOneof("record_type") == "run"]
    return run


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Keeps W&B's own settings, cache and credentials out of the home directory."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        unset_env(monkeypatch, var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return ["metrics.wandb.mode=offline", "metrics.wandb.project=vimoe-test", "train.progress=false"]


def build(run_dir: Path, overrides: list[str], start_step: int = 0):
    cfg = load_config(None, overrides)
    return build_metrics(
        cfg, rank=0, local_rank=0, world_size=1, run_dir=run_dir, total_steps=20, start_step=start_step
    )


def fake_run(metrics, first: int, last: int) -> None:
    for step in range(first, last + 1):
        metrics.on_step(step, images=8, step_seconds=0.05, data_wait_seconds=0.01, alltoall_seconds=0.004)
        if step % 5 == 0:
            metrics.on_log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_sec": 160.0, "grad_norm": 0.3,
                            "moe": {"5": {"tokens": [4, 4, 8, 0], "dropped": 1, "entropy": 1.3}}})  # fmt: skip


def test_offline_run_reads_back_and_a_resume_continues_the_same_run(tmp_path, offline):
    import numpy as np

    run_dir = tmp_path / "run"
    metrics = build(run_dir, [*offline, "metrics.wandb.tags=[a, b]"])
    fake_run(metrics, 1, 10)
    metrics.on_eval({"step": 10, "eval_top1": 0.5, "eval_top5": 0.75, "eval_loss": 1.5, "images": 80})
    metrics.on_image("routing/block_5", np.zeros((6, 8, 3), np.uint8), 10)
    metrics.close()

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (first,) = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    run = run_record(first)
    assert run.run_id == run_id and run.project == "vimoe-test" and list(run.tags) == ["a", "b"]
    assert run.display_name == "run"  # the run directory's name
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["moe"]["router"] == "tc-softmax" and config["metrics"]["wandb"]["mode"] == "offline"
    rows = history(first)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    assert train[0]["train/loss"] == pytest.approx(0.2) and train[1]["train/alltoall_seconds"] == pytest.approx(0.004)
    assert train[1]["moe/block_5/expert_load/values"] == [4, 4, 8, 0]
    assert train[1]["moe/block_5/expert_load/bins"] == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert train[1]["moe/block_5/imbalance"] == 2.0
    (ev,) = [r for r in rows if "eval/top1" in r]
    assert ev["step"] == 10 and ev["eval/top1"] == 0.5
    (img,) = [r for r in rows if "routing/block_5/_type" in r]
    assert (img["step"], img["routing/block_5/width"], img["routing/block_5/height"]) == (10, 8, 6)
    assert (first.parent / "files" / img["routing/block_5/path"]).is_file()

    again = build(run_dir, offline, start_step=10)  # rerunning the command on the run directory
    fake_run(again, 11, 15)
    again.close()
    second = [p for p in run_dir.glob("wandb/offline-run-*/run-*.wandb") if p != first]
    assert len(second) == 1 and run_record(second[0]).run_id == run_id  # the same W&B run
    assert [r["step"] for r in history(second[0]) if "train/loss" in r] == [15]


def test_a_run_that_cannot_start_is_one_warning_and_training_goes_on(tmp_path, offline, caplog):
    # online without an API key (and no terminal to ask for one): wandb.init fails, the run does not
    overrides = ["metrics.wandb.mode=online", "metrics.wandb.project=vimoe-test", "train.progress=false"]
    with caplog.at_level(logging.WARNING):
        metrics = build(tmp_path, overrides)
    fake_run(metrics, 1, 5)
    metrics.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vimoe")]
    assert len(warnings) == 1 and warnings[0].startswith("metrics.wandb: W&B did not start"), warnings
    assert "\n" not in warnings[0]
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 1


def test_bad_mode_and_tags_are_one_line(offline):
    with pytest.raises(ConfigError, match=r"^metrics.wandb.mode: 'cloud' is not one of offline, online, disabled$"):
        load_config(None, ["metrics.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match=r"^metrics.wandb.tags: expected a list of strings"):
        load_config(None, ["metrics.wandb.tags=oops"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'metrics.wandb.projet'"):
        load_config(None, ["metrics.wandb.projet=x"])


def test_disabled_or_unset_starts_nothing(tmp_path, offline):
    for overrides in (["metrics.wandb.mode=disabled", "metrics.wandb.project=p"], []):
        metrics = build(tmp_path, [*overrides, "train.progress=false"])
        assert not metrics.accepts_images
        metrics.close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()


def test_without_the_package_one_line_says_how_to_install_it(tmp_path, offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not installed
    with pytest.raises(UserError, match=r"^metrics.wandb: needs the wandb package: pip install") as info:
        build(tmp_path, offline)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.raises(UserError, match=r"^metrics.wandb: needs the wandb package"):
        check_trackers(load_config(None, offline))  # the same check, for launchers, before any rank starts
