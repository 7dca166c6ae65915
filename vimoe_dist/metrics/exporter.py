"""The Prometheus series of one rank, kept as plain Python numbers and rendered only when scraped.

Why a custom collector instead of `prometheus_client.Counter` objects: the training thread is the only writer, so
`on_step` can add to floats with no lock at all (the scrape thread only reads; under the GIL a read sees either
the old or the new float), and the totals can be saved to and restored from a checkpoint exactly, histogram
buckets included, which the client library's metric objects do not allow. Per-layer dictionaries change only in
`on_log`/`on_eval` and are read by `collect`; those two share a lock (taken every `log_every` steps, never per step).

Names follow the Prometheus conventions (https://prometheus.io/docs/practices/naming/): base units (seconds,
bytes, ratios), `_total` for counters, and label sets bounded by the run (`layer` = MoE block index, `expert` =
global expert id, `event` = one of the trainer's warning names). Every series carries `job` (`metrics.job`) and
`rank` (global rank).
"""

from __future__ import annotations

import bisect
import logging
import math
import resource
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# step times run from ~10 ms (tiny CPU demo) to tens of seconds (large models, many accumulation micro-steps)
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# counters restored from a checkpoint: attribute name -> (series name without _total, help)
COUNTERS = {
    "steps": ("vimoe_train_steps", "Optimizer steps taken by this rank."),
    "images": ("vimoe_train_images", "Training images consumed by this rank."),
    "data_wait_seconds": ("vimoe_data_wait_seconds", "Time the training loop waited for the next batch."),
    "alltoall_seconds": ("vimoe_alltoall_seconds", "Time spent in expert-parallel all-to-all exchanges."),
    "bad_samples": ("vimoe_data_bad_samples", "Samples this rank skipped because they could not be decoded."),
    "checkpoints": ("vimoe_checkpoint_saves", "Checkpoints saved."),
}

# gauges set from on_log / on_eval records: record key -> (series name, help)
LOG_GAUGES = {
    "loss": ("vimoe_train_loss", "Training loss of the last logged step."),
    "lr": ("vimoe_train_lr", "Learning rate (of the first parameter group) at the last logged step."),
    "images_per_sec": ("vimoe_train_images_per_second", "Training throughput over the last log interval."),
    "grad_norm": ("vimoe_train_grad_norm", "Global gradient norm before clipping at the last logged step."),
    "tokens_per_sec": ("vimoe_train_tokens_per_second", "Tokens (patches and prefix tokens) per second, all ranks."),
    "flops_per_image": ("vimoe_train_flops_per_image", "Training model FLOPs per image (3 x forward)."),
    "achieved_tflops": ("vimoe_train_flops_per_second", "Achieved training model FLOP/s per device."),
    "mfu": ("vimoe_train_mfu", "Model-FLOPs utilisation (ratio): achieved FLOP/s over the device's dense peak."),
    "gpu_allocated_bytes": ("vimoe_gpu_memory_allocated_bytes", "GPU memory allocated by tensors at the last log."),
    "gpu_reserved_bytes": ("vimoe_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator."),
    "gpu_peak_allocated_bytes": ("vimoe_gpu_memory_peak_allocated_bytes", "Peak GPU memory allocated, last interval."),
}
LOG_SCALES = {"achieved_tflops": 1e12}  # record units -> the series' base units (FLOP/s)
EVAL_GAUGES = {
    "eval_top1": ("vimoe_eval_top1", "Top-1 accuracy (ratio) of the last evaluation."),
    "eval_top5": ("vimoe_eval_top5", "Top-5 accuracy (ratio) of the last evaluation."),
    "eval_loss": ("vimoe_eval_loss", "Loss of the last evaluation."),
}


class TrainingCollector(Collector):
    """All `vimoe_*` series of one rank.

    Args:
        job: value of the `job` label (`metrics.job`).
        rank: global rank, the `rank` label.
        build_info: labels of `vimoe_build_info` (version, config_hash, world_size, ep_size, ...).
        total_steps: the run's `train.steps`, exported as `vimoe_train_steps_target`.
    """

    def __init__(self, job: str, rank: int, build_info: Mapping[str, str], total_steps: int) -> None:
        self.labels = [job, str(rank)]
        self.rank = rank
        self.build_info = {k: str(v) for k, v in build_info.items()}
        self.total_steps = total_steps
        self.counters = dict.fromkeys(COUNTERS, 0.0)
        self.step = -1
        self.last_step_time = 0.0
        self.bucket_bounds = STEP_SECONDS_BUCKETS
        self.bucket_counts = [0] * (len(self.bucket_bounds) + 1)  # per bucket (not cumulative); last is +Inf
        self.step_seconds_sum = 0.0
        self.gauges: dict[str, float] = {}
        self.moe_tokens: dict[str, list[float]] = {}
        self.moe_dropped: dict[str, float] = {}
        self.moe_imbalance: dict[str, float] = {}
        self.moe_entropy: dict[str, float] = {}
        self.events: dict[str, float] = {}
        self.bad_samples_seen = 0.0  # the trainer reports bad samples cumulatively; counters need increments
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- updates

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None:
        c = self.counters
        c["steps"] += 1
        c["images"] += images
        c["data_wait_seconds"] += data_wait_seconds
        c["alltoall_seconds"] += alltoall_seconds
        self.bucket_counts[bisect.bisect_left(self.bucket_bounds, step_seconds)] += 1  # le semantics: x <= bound
        self.step_seconds_sum += step_seconds
        self.step = step
        self.last_step_time = time.time()

    def on_log(self, record: Mapping[str, Any]) -> None:
        with self.lock:
            for key in LOG_GAUGES:
                if _is_number(record.get(key)):
                    self.gauges[key] = float(record[key]) * LOG_SCALES.get(key, 1.0)
            if _is_number(record.get("bad_samples")):
                seen = float(record["bad_samples"])
                # a smaller cumulative count means the trainer's own count restarted (a resume that did not
                # restore it): then everything it reports is new
                new = seen - self.bad_samples_seen if seen >= self.bad_samples_seen else seen
                self.counters["bad_samples"] += new
                self.bad_samples_seen = seen
            for layer, stats in (record.get("moe") or {}).items():
                self._on_layer(str(layer), stats)

    def _on_layer(self, layer: str, stats: Mapping[str, Any]) -> None:
        tokens = [float(t) for t in stats.get("tokens") or ()]
        if tokens:
            total = self.moe_tokens.setdefault(layer, [])
            total.extend([0.0] * (len(tokens) - len(total)))
            for e, t in enumerate(tokens):
                total[e] += t
        if _is_number(stats.get("dropped")):
            self.moe_dropped[layer] = self.moe_dropped.get(layer, 0.0) + float(stats["dropped"])
        if _is_number(stats.get("imbalance")):
            self.moe_imbalance[layer] = float(stats["imbalance"])
        elif tokens and sum(tokens) > 0:
            self.moe_imbalance[layer] = max(tokens) / (sum(tokens) / len(tokens))
        if _is_number(stats.get("entropy")):
            self.moe_entropy[layer] = float(stats["entropy"])

    def on_eval(self, record: Mapping[str, Any]) -> None:
        with self.lock:
            for key in EVAL_GAUGES:
                if _is_number(record.get(key)):
                    self.gauges[key] = float(record[key])

    def on_checkpoint(self, step: int, seconds: float) -> None:
        with self.lock:
            self.counters["checkpoints"] += 1
            self.gauges["checkpoint_seconds"] = float(seconds)
            self.gauges["checkpoint_step"] = float(step)

    def on_event(self, name: str) -> None:
        with self.lock:
            self.events[name] = self.events.get(name, 0.0) + 1

    # ------------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        with self.lock:
            return {
                "rank": self.rank,
                "counters": dict(self.counters),
                "step_seconds": {
                    "bounds": list(self.bucket_bounds),
                    "counts": list(self.bucket_counts),
                    "sum": self.step_seconds_sum,
                },
                "moe_tokens": {k: list(v) for k, v in self.moe_tokens.items()},
                "moe_dropped": dict(self.moe_dropped),
                "events": dict(self.events),
                "bad_samples_seen": self.bad_samples_seen,
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adds the saved totals to this process's (call it once, before the first step of a resumed run)."""
        with self.lock:
            for key, value in state.get("counters", {}).items():
                if key in self.counters:
                    self.counters[key] += float(value)
            hist = state.get("step_seconds") or {}
            if tuple(hist.get("bounds", ())) == tuple(self.bucket_bounds):
                self.bucket_counts = [a + int(b) for a, b in zip(self.bucket_counts, hist["counts"])]
                self.step_seconds_sum += float(hist["sum"])
            elif hist:
                log.warning("metrics: saved step-time histogram has other buckets; it starts again from zero")
            for layer, tokens in state.get("moe_tokens", {}).items():
                self._on_layer(str(layer), {"tokens": tokens})
            for layer, dropped in state.get("moe_dropped", {}).items():
                self.moe_dropped[str(layer)] = self.moe_dropped.get(str(layer), 0.0) + float(dropped)
            for name, count in state.get("events", {}).items():
                self.events[name] = self.events.get(name, 0.0) + float(count)
            self.bad_samples_seen = float(state.get("bad_samples_seen", self.bad_samples_seen))
            self.moe_imbalance.clear()  # gauges of the previous process are stale; the next on_log sets them

    # ------------------------------------------------------------------------------------------- export

    def collect(self) -> Iterator[Any]:
        base = ["job", "rank"]
        lab = self.labels
        info = InfoMetricFamily("vimoe_build", "Version and shape of this run.", labels=base)
        info.add_metric(lab, self.build_info)
        yield info

        for key, (name, doc) in COUNTERS.items():
            yield _one(CounterMetricFamily, name, doc, lab, self.counters[key])
        yield _one(GaugeMetricFamily, "vimoe_train_step", "Last step completed.", lab, max(self.step, 0))
        yield _one(GaugeMetricFamily, "vimoe_train_steps_target", "train.steps of this run.", lab, self.total_steps)
        if self.last_step_time:
            doc = "Unix time of the last completed step (alert on time() minus this to catch a hung job)."
            yield _one(GaugeMetricFamily, "vimoe_train_last_step_timestamp_seconds", doc, lab, self.last_step_time)

        counts = list(self.bucket_counts)
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bucket_bounds, math.inf), counts):
            cumulative += n
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        hist = HistogramMetricFamily("vimoe_train_step_seconds", "Wall time of one optimizer step.", labels=base)
        hist.add_metric(lab, buckets, self.step_seconds_sum)
        yield hist

        with self.lock:
            gauges = dict(self.gauges)
            layers = {k: list(v) for k, v in self.moe_tokens.items()}
            dropped, imbalance, entropy = dict(self.moe_dropped), dict(self.moe_imbalance), dict(self.moe_entropy)
            events = dict(self.events)
        for key, (name, doc) in {**LOG_GAUGES, **EVAL_GAUGES}.items():
            if key in gauges:
                yield _one(GaugeMetricFamily, name, doc, lab, gauges[key])
        if "checkpoint_seconds" in gauges:
            doc = "Wall time of the last checkpoint save."
            yield _one(GaugeMetricFamily, "vimoe_checkpoint_seconds", doc, lab, gauges["checkpoint_seconds"])
            doc = "Step of the last checkpoint."
            yield _one(GaugeMetricFamily, "vimoe_checkpoint_step", doc, lab, gauges["checkpoint_step"])

        doc = "Token assignments received by each expert of each MoE layer on this rank."
        tokens = CounterMetricFamily("vimoe_moe_tokens", doc, labels=[*base, "layer", "expert"])
        for layer in sorted(layers, key=_layer_order):
            for e, n in enumerate(layers[layer]):
                tokens.add_metric([*lab, layer, str(e)], n)
        yield tokens
        doc = "Token assignments dropped because their expert was over capacity."
        yield _per_layer(CounterMetricFamily, "vimoe_moe_dropped_tokens", doc, lab, dropped)
        doc = "Max over mean tokens per expert in the last log interval (1 is perfectly balanced)."
        yield _per_layer(GaugeMetricFamily, "vimoe_moe_load_imbalance", doc, lab, imbalance)
        doc = "Mean entropy of the router's distribution over experts (nats) in the last log interval."
        yield _per_layer(GaugeMetricFamily, "vimoe_moe_router_entropy", doc, lab, entropy)

        ev = CounterMetricFamily("vimoe_events", "Warnings raised by the trainer.", labels=[*base, "event"])
        for name in sorted(events):
            ev.add_metric([*lab, name], events[name])
        yield ev

        rss, peak = process_memory_bytes()
        yield _one(GaugeMetricFamily, "vimoe_process_resident_memory_bytes", "Resident memory now.", lab, rss)
        doc = "Peak resident memory of this process."
        yield _one(GaugeMetricFamily, "vimoe_process_peak_resident_memory_bytes", doc, lab, peak)


def _per_layer(family: type, name: str, doc: str, labels: list[str], values: Mapping[str, float]) -> Any:
    metric = family(name, doc, labels=["job", "rank", "layer"])
    for layer in sorted(values, key=_layer_order):
        metric.add_metric([*labels, layer], values[layer])
    return metric


def _one(family: type, name: str, doc: str, labels: list[str], value: float) -> Any:
    metric = family(name, doc, labels=["job", "rank"])
    metric.add_metric(labels, value)
    return metric


def _layer_order(layer: str) -> tuple[int, str]:
    return (int(layer), "") if layer.lstrip("-").isdigit() else (1 << 30, layer)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def process_memory_bytes() -> tuple[float, float]:
    """(resident, peak resident) bytes of this process, from /proc on Linux, else getrusage (peak only)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return float(fields["VmRSS"].split()[0]) * 1024, float(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux
        return peak, peak
