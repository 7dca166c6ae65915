"""`metrics.tensorboard: true`: rank 0's event files under RUN/tb, read back with TensorBoard's own reader
(`tensorboard.backend.event_processing`): every scalar of a logged record, expert load histograms, images."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError
from vimoe_dist.metrics import build_metrics

pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'vimoe-dist[tensorboard]'")
pytest.importorskip("torch")

TOKENS = [4, 4, 8, 0]


def read_back(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def fake_run(metrics, first: int, last: int, log_every: int = 5) -> None:
    for step in range(first, last + 1):
        metrics.on_step(step, images=8, step_seconds=0.05, data_wait_seconds=0.01, alltoall_seconds=0.002 * step)
        if step % log_every == 0:
            metrics.on_log(
                {
                    "step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_sec": 160.0, "grad_norm": 0.3,
                    "step_seconds": 0.05, "data_wait_seconds": 0.01, "bad_samples": 0,
                    "gpu": {"allocated_bytes": 1024 * step},  # a key today's records lack: it shows up all the same
                    "moe": {"5": {"tokens": TOKENS, "dropped": 1, "entropy": 1.3}},
                }
            )  # fmt: skip


def build(tmp_path, start_step: int = 0, *extra: str):
    cfg = load_config(None, ["metrics.tensorboard=true", "train.progress=false", *extra])
    return build_metrics(
        cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=20, start_step=start_step
    )


def test_scalars_histograms_images_and_text_read_back(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    metrics = build(tmp_path)
    assert metrics.accepts_images
    fake_run(metrics, 1, 10)
    metrics.on_eval({"step": 10, "eval_top1": 0.625, "eval_top5": 0.9, "eval_loss": 1.2, "images": 400})
    metrics.on_checkpoint(10, 0.7)
    metrics.on_event("expert_collapse", step=10, layer=5, share=0.9)
    fig = Figure(figsize=(2, 1), dpi=50)
    fig.subplots().imshow(np.eye(4))
    metrics.on_image("routing/block_5", fig, 10)
    metrics.on_image("routing/array", np.full((6, 8), 0.5), 10)
    Image.new("RGB", (12, 7), (255, 0, 0)).save(tmp_path / "heat.png")
    metrics.on_image("routing/file", tmp_path / "heat.png", 10)
    metrics.close()

    acc = read_back(tmp_path / "tb")
    assert scalars(acc, "train/loss") == pytest.approx({5: 0.2, 10: 0.1})
    for tag in ("lr", "images_per_sec", "grad_norm", "step_seconds", "data_wait_seconds", "bad_samples"):
        assert set(scalars(acc, f"train/{tag}")) == {5, 10}, tag
    assert scalars(acc, "train/gpu/allocated_bytes") == {5: 5120.0, 10: 10240.0}
    # all-to-all time per step: the mean over each log interval of what on_step received
    assert scalars(acc, "train/alltoall_seconds") == pytest.approx({5: 0.006, 10: 0.016})
    assert scalars(acc, "moe/block_5/imbalance") == {5: 2.0, 10: 2.0}  # max / mean of TOKENS
    assert scalars(acc, "moe/block_5/dropped")[10] == 1.0 and "moe/block_5/entropy" in acc.Tags()["scalars"]
    assert scalars(acc, "eval/top1") == pytest.approx({10: 0.625}) and scalars(acc, "eval/images") == {10: 400.0}
    assert scalars(acc, "checkpoint/seconds") == pytest.approx({10: 0.7})
    assert scalars(acc, "events/expert_collapse") == {10: 1.0}

    (load5, load10) = acc.Histograms("moe/block_5/expert_load")
    assert (load5.step, load10.step) == (5, 10)
    h = load10.histogram_value
    assert list(h.bucket) == TOKENS and list(h.bucket_limit) == [0.5, 1.5, 2.5, 3.5]  # bucket e is expert e
    assert (h.min, h.max, h.num) == (-0.5, 3.5, 16.0)

    images = {tag: acc.Images(tag)[0] for tag in ("routing/block_5", "routing/array", "routing/file")}
    assert all(e.step == 10 for e in images.values())
    assert (images["routing/block_5"].width, images["routing/block_5"].height) == (100, 50)
    assert (images["routing/array"].width, images["routing/array"].height) == (8, 6)
    red = Image.open(io.BytesIO(images["routing/file"].encoded_image_string)).convert("RGB")
    assert red.size == (12, 7) and red.getpixel((3, 3)) == (255, 0, 0)
    assert {"config/text_summary", "events/text_summary"} <= set(acc.Tags()["tensors"])


def test_a_resume_hides_the_redone_steps(tmp_path):
    first = build(tmp_path)
    fake_run(first, 1, 20)
    first.close()
    again = build(tmp_path, start_step=10)  # the last checkpoint was at step 10
    fake_run(again, 11, 15)
    again.close()
    losses = scalars(read_back(tmp_path / "tb"), "train/loss")
    assert sorted(losses) == [5, 10, 15]  # the first attempt's 15 and 20 are purged
    assert losses[15] == pytest.approx(1 / 15)


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    (tmp_path / "tb").write_text("a file where the directory should be\n")
    with pytest.raises(UserError, match=r"^metrics.tensorboard: cannot write .*tb \(") as info:
        build(tmp_path)
    assert "\n" not in str(info.value)


def test_without_the_package_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a module as not installed
    with pytest.raises(UserError, match=r"^metrics.tensorboard: needs the tensorboard package: pip install") as info:
        build(tmp_path)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_without_tensorboard_images_are_not_even_converted(tmp_path):
    cfg = load_config(None, ["train.progress=false"])
    metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1)
    assert not metrics.accepts_images
    metrics.on_image("routing/block_5", "no such file.png", 1)  # never read: no sink takes images
    metrics.close()
