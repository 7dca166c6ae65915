"""`vimoe plot RUN_DIR` on a finished run made by the real JSONL sink (a fake loop stands in for the trainer)."""

from __future__ import annotations

import math
import random

import pytest

from vimoe_dist.cli import main
from vimoe_dist.metrics.jsonl import JsonlSink
from vimoe_dist.metrics.plot import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir, layers=("10", "11"), num_experts=8, steps=400, every=10, gpu=False):
    rng = random.Random(0)
    sink = JsonlSink(run_dir)
    for step in range(every, steps + 1, every):
        moe = {}
        for i, layer in enumerate(layers):
            weights = [1.0 + 0.2 * rng.random() for _ in range(num_experts)]
            weights[0] += 6.0 * i * step / steps  # the last layer collapses onto expert 0
            tokens = [round(512 * w / sum(weights)) for w in weights]
            moe[layer] = {"tokens": tokens, "dropped": 3 * i, "entropy": 2.0 - i * step / steps, "imbalance": 1.1}
        efficiency = {}
        if gpu:  # what a GPU run's records add (train/efficiency.py)
            efficiency = {"achieved_tflops": 120 + 10 * rng.random(), "mfu": 0.12 + 0.01 * rng.random(),
                          "gpu_peak_allocated_bytes": 30 << 30, "gpu_reserved_bytes": 34 << 30,
                          "gpu_allocated_bytes": 12 << 30, "grad_norm": 1.0 / (1 + step / 100)}  # fmt: skip
        sink.on_log(
            {"step": step, "loss": 2.3 * math.exp(-step / 150) + 0.1, "lr": 1e-3 * min(1.0, step / 50),
             "images_per_sec": 400 + 20 * rng.random(), "moe": moe, **efficiency}
        )  # fmt: skip
        if step % 100 == 0:
            sink.on_eval({"step": step, "eval_top1": 1 - math.exp(-step / 120), "eval_loss": 1.0, "images": 100})
    sink.on_event("expert_collapse", step=steps, layer=layers[-1] if layers else None)
    sink.close()


def check_png(path, min_size=(600, 300)):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_size[0] and height >= min_size[1]
    assert pixels.std() > 0.05  # something was drawn


def test_vimoe_plot_writes_the_expected_panels(tmp_path, capsys):
    fake_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 0
    plots = tmp_path / "plots"
    assert {p.name for p in plots.iterdir()} == {"training.png", "expert_load.png", "routing.png"}
    for png in plots.iterdir():
        check_png(png)
    # one line per PNG: "path: panel | panel | ..."
    panels = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert panels[str(plots / "training.png")].split(" | ") == [
        "loss", "top-1 accuracy (eval, %)", "throughput (images/s)", "learning rate",
    ]  # fmt: skip
    assert panels[str(plots / "expert_load.png")].split(" | ") == ["expert load, block 10", "expert load, block 11"]
    assert panels[str(plots / "routing.png")].split(" | ") == [
        "load imbalance (max / mean)", "router entropy (nats)", "dropped assignments (%)",
    ]  # fmt: skip


def test_a_gpu_run_gets_its_efficiency_curves(tmp_path):
    fake_run(tmp_path, steps=100, gpu=True)
    panels = plot_run(tmp_path)
    assert panels[tmp_path / "plots" / "efficiency.png"] == [
        "achieved TFLOP/s per device", "MFU (%)", "GPU memory, rank 0 (GiB)", "gradient norm (before clipping)",
    ]  # fmt: skip
    check_png(tmp_path / "plots" / "efficiency.png")


def test_dense_run_without_eval_gets_the_training_curves_only(tmp_path):
    fake_run(tmp_path, layers=(), steps=50)
    panels = plot_run(tmp_path)
    assert list(panels) == [tmp_path / "plots" / "training.png"]
    check_png(tmp_path / "plots" / "training.png")


def test_missing_metrics_file_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err
