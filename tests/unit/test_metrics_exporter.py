"""The Prometheus series of one rank: exposition text, counter totals across a resume, the hot path.

A small fake training loop drives the real sinks (the trainer passes the same plain numbers)."""

from __future__ import annotations

import itertools
import json
import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vimoe_dist.config import load_config
from vimoe_dist.metrics import build_metrics

LAYERS = ("10", "11")
NUM_EXPERTS = 4


def fake_loop(metrics, first: int, last: int, log_every: int = 5, bad_samples: int = 0) -> dict:
    """Steps first..last; returns the totals the series must show for these steps."""
    sums = {"images": 0, "wait": 0.0, "a2a": 0.0, "tokens": {layer: [0] * NUM_EXPERTS for layer in LAYERS}}
    for step in range(first, last + 1):
        seconds = 0.02 * (1 + step % 7)  # 0.02 .. 0.14: spreads over several histogram buckets
        metrics.on_step(step, images=16, step_seconds=seconds, data_wait_seconds=0.005, alltoall_seconds=0.001)
        sums["images"] += 16
        sums["wait"] += 0.005
        sums["a2a"] += 0.001
        if step % log_every == 0:
            moe = {}
            for i, layer in enumerate(LAYERS):
                tokens = [step + e + i for e in range(NUM_EXPERTS)]
                moe[layer] = {"tokens": tokens, "dropped": i, "entropy": 1.0 + i, "imbalance": 1.5}
                sums["tokens"][layer] = [a + b for a, b in zip(sums["tokens"][layer], tokens)]
            record = {"step": step, "loss": 3.0 / step, "lr": 1e-3, "images_per_sec": 800.0, "grad_norm": 0.5}
            metrics.on_log({**record, "bad_samples": bad_samples, "moe": moe})
    return sums


def scrape(metrics) -> dict:
    """Parses the exposition text with prometheus_client's own parser: {sample name: {labels: value}}."""
    text = metrics.prometheus.render().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def families(metrics) -> dict:
    return {f.name: f.type for f in text_string_to_metric_families(metrics.prometheus.render().decode())}


def one(samples: dict, name: str, **labels: str) -> float:
    matches = [v for k, v in samples[name].items() if all(dict(k).get(a) == b for a, b in labels.items())]
    assert len(matches) == 1, (name, labels, samples[name])
    return matches[0]


@pytest.fixture
def cfg():
    return load_config(None, ["metrics.job=unit", "train.progress=false"])


def test_exposition_parses_and_carries_every_series(cfg, tmp_path):
    metrics = build_metrics(cfg, rank=1, local_rank=1, world_size=2, run_dir=tmp_path, total_steps=20)
    sums = fake_loop(metrics, 1, 20)
    metrics.on_eval({"step": 20, "eval_top1": 0.75, "eval_top5": 0.95, "eval_loss": 0.8, "images": 64})
    metrics.on_checkpoint(20, 2.5)
    metrics.on_event("expert_collapse", step=20, layer=11)
    kinds = families(metrics)
    samples = scrape(metrics)
    metrics.close()

    expected = {
        # DESIGN.md "Prometheus"
        "vimoe_train_steps": "counter", "vimoe_train_images": "counter", "vimoe_train_loss": "gauge",
        "vimoe_train_step_seconds": "histogram", "vimoe_data_wait_seconds": "counter",
        "vimoe_moe_tokens": "counter", "vimoe_moe_dropped_tokens": "counter", "vimoe_eval_top1": "gauge",
        # issue 6
        "vimoe_train_images_per_second": "gauge", "vimoe_train_lr": "gauge", "vimoe_train_grad_norm": "gauge",
        "vimoe_alltoall_seconds": "counter", "vimoe_moe_load_imbalance": "gauge", "vimoe_moe_router_entropy": "gauge",
        "vimoe_data_bad_samples": "counter", "vimoe_checkpoint_seconds": "gauge", "vimoe_eval_loss": "gauge",
        "vimoe_process_resident_memory_bytes": "gauge", "vimoe_build_info": "gauge",
    }  # fmt: skip
    for name, kind in expected.items():
        assert kinds.get(name) == kind, (name, kinds.get(name))
    for name, by_labels in samples.items():
        for labels in by_labels:
            assert dict(labels)["job"] == "unit" and dict(labels)["rank"] == "1", (name, labels)

    assert one(samples, "vimoe_train_steps_total") == 20
    assert one(samples, "vimoe_train_images_total") == sums["images"]
    assert one(samples, "vimoe_data_wait_seconds_total") == pytest.approx(sums["wait"])
    assert one(samples, "vimoe_alltoall_seconds_total") == pytest.approx(sums["a2a"])
    assert one(samples, "vimoe_train_loss") == pytest.approx(3.0 / 20)
    assert one(samples, "vimoe_eval_top1") == 0.75 and one(samples, "vimoe_checkpoint_seconds") == 2.5
    assert one(samples, "vimoe_events_total", event="expert_collapse") == 1
    for layer in LAYERS:
        for e in range(NUM_EXPERTS):
            assert one(samples, "vimoe_moe_tokens_total", layer=layer, expert=str(e)) == sums["tokens"][layer][e]
        assert one(samples, "vimoe_moe_router_entropy", layer=layer) == 1.0 + LAYERS.index(layer)
    assert one(samples, "vimoe_moe_dropped_tokens_total", layer="11") == 4  # 1 per log, 4 logs
    info = dict(next(iter(samples["vimoe_build_info"])))
    assert info["world_size"] == "2" and info["ep_size"] == str(cfg.parallel.ep_size) and len(info["config_hash"]) == 12
    assert one(samples, "vimoe_process_resident_memory_bytes") > 1e6

    # histogram: cumulative buckets, +Inf == count == steps, sum == total step time
    buckets = sorted(
        ((float(dict(k)["le"]), v) for k, v in samples["vimoe_train_step_seconds_bucket"].items()), key=lambda b: b[0]
    )
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert buckets[-1] == (math.inf, 20) and one(samples, "vimoe_train_step_seconds_count") == 20
    assert one(samples, "vimoe_train_step_seconds_sum") == pytest.approx(sum(0.02 * (1 + s % 7) for s in range(1, 21)))
    assert 0 < dict(buckets)[0.05] < 20  # the step times really spread over buckets


def test_counters_never_decrease_across_resume(cfg, tmp_path):
    first = build_metrics(cfg, rank=0, local_rank=0, world_size=2, run_dir=tmp_path, total_steps=40)
    fake_loop(first, 1, 20, bad_samples=3)
    first.on_checkpoint(20, 1.0)
    first.on_event("bad_step", step=20)
    before = scrape(first)
    # the checkpoint keeps every rank's state, all-gathered (it goes through pickle or JSON: plain data only)
    saved = json.loads(json.dumps([first.state_dict(), {**first.state_dict(), "rank": 1}]))
    first.close()

    resumed = build_metrics(cfg, rank=0, local_rank=0, world_size=2, run_dir=tmp_path, total_steps=40, start_step=20)
    resumed.load_state_dict(saved)
    restored = scrape(resumed)
    fake_loop(resumed, 21, 40, bad_samples=2)  # the trainer's own bad-sample count restarted: 2 new ones
    after = scrape(resumed)
    resumed.close()

    checked = 0
    for name, by_labels in before.items():
        if not (name.endswith("_total") or name.endswith("_bucket") or name.endswith(("_count", "_sum"))):
            continue
        for labels, value in by_labels.items():
            assert restored[name][labels] == pytest.approx(value), (name, labels)
            assert after[name][labels] >= restored[name][labels], (name, labels)
            checked += 1
    assert checked > 20
    assert one(after, "vimoe_train_steps_total") == 40
    assert one(after, "vimoe_data_bad_samples_total") == 5
    assert one(after, "vimoe_checkpoint_saves_total") == 1 and one(after, "vimoe_events_total", event="bad_step") == 1
    assert one(after, "vimoe_train_step_seconds_count") == 40


def test_load_state_picks_this_ranks_entry(cfg, tmp_path):
    states = []
    for rank in (0, 1):
        m = build_metrics(cfg, rank=rank, local_rank=rank, world_size=2, run_dir=tmp_path / str(rank), total_steps=9)
        fake_loop(m, 1, 5 + 4 * rank)  # rank 1 took more steps: its totals differ
        states.append(m.state_dict())
        m.close()
    m = build_metrics(cfg, rank=1, local_rank=1, world_size=2, run_dir=tmp_path / "1", total_steps=9)
    m.load_state_dict(states)
    assert one(scrape(m), "vimoe_train_steps_total") == 9
    m.close()


def test_hot_path_takes_no_lock_and_scrapes_run_alongside(cfg, tmp_path):
    metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=3000)

    class NoLock:  # any acquisition on the hot path fails the test
        def __enter__(self):
            raise AssertionError("on_step took a lock")

        def __exit__(self, *exc):
            return False

    collector = metrics.prometheus.collector
    real_lock, collector.lock = collector.lock, NoLock()
    for step in range(1, 101):
        metrics.on_step(step, images=1, step_seconds=0.01, data_wait_seconds=0.0, alltoall_seconds=0.0)
    collector.lock = real_lock

    errors, stop = [], threading.Event()

    def scraper():  # counters seen by successive scrapes never go down while the loop writes them
        last = (0.0, 0.0)
        while not stop.is_set():
            try:
                s = scrape(metrics)
                now = (one(s, "vimoe_train_steps_total"), one(s, "vimoe_train_images_total"))
                assert now[0] >= last[0] and now[1] >= last[1], (last, now)
                last = now
            except Exception as e:  # reported by the main thread
                errors.append(e)
                return

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        fake_loop(metrics, 101, 3000, log_every=50)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    samples = scrape(metrics)
    assert one(samples, "vimoe_train_steps_total") == 3000
    counts = samples["vimoe_train_step_seconds_bucket"]
    assert max(counts.values()) == one(samples, "vimoe_train_step_seconds_count") == 3000
    metrics.close()


def test_imbalance_is_computed_when_the_trainer_does_not_send_it(cfg, tmp_path):
    metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1)
    metrics.on_step(1, images=4, step_seconds=0.1)
    metrics.on_log({"step": 1, "loss": 1.0, "lr": 0.1, "images_per_sec": 4.0, "moe": {"3": {"tokens": [6, 2, 0, 0]}}})
    assert one(scrape(metrics), "vimoe_moe_load_imbalance", layer="3") == 3.0  # max 6 / mean 2
    metrics.close()


def test_efficiency_and_gpu_memory_gauges_in_base_units(cfg, tmp_path):
    metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=20)
    gpu = {"gpu_allocated_bytes": 3 << 30, "gpu_reserved_bytes": 4 << 30, "gpu_peak_allocated_bytes": 5 << 30}
    metrics.on_log({"step": 5, "loss": 1.0, "tokens_per_sec": 4352.0, "flops_per_image": 3.2e9,
                    "achieved_tflops": 123.5, "mfu": 0.4125, **gpu})  # fmt: skip
    samples = scrape(metrics)
    assert one(samples, "vimoe_train_flops_per_second", rank="0") == 123.5e12  # TFLOP/s in the record, FLOP/s here
    assert one(samples, "vimoe_train_mfu") == 0.4125 and one(samples, "vimoe_train_flops_per_image") == 3.2e9
    assert one(samples, "vimoe_train_tokens_per_second") == 4352.0
    for key, value in gpu.items():
        assert one(samples, f"vimoe_gpu_memory_{key.removeprefix('gpu_')}") == value
    metrics.on_log({"step": 10, "loss": 0.9})  # a CPU rank's record, or one before any FLOP was counted
    assert one(scrape(metrics), "vimoe_train_mfu") == 0.4125  # gauges keep their last value
    metrics.close()
