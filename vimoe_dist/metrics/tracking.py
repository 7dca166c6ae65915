"""What the experiment trackers (TensorBoard, Weights & Biases) show: one mapping from the trainer's records to
named scalars, histograms, texts and images, shared by both so that a run reads the same in either.

Names, grouped by their first path component (a TensorBoard section, a W&B panel section):

- `train/<key>`: every number of a logged record (loss, lr, images_per_sec, grad_norm, step_seconds,
  data_wait_seconds, alltoall_seconds, tokens_per_sec, flops_per_image, achieved_tflops, mfu, gpu_*_bytes,
  bad_samples, and any number a later record adds; a nested mapping `{key: {sub: number}}` becomes
  `train/<key>/<sub>`), except `moe`, which has its own section;
- `train/alltoall_seconds`: expert-parallel all-to-all time per step, the mean over the log interval of what
  `on_step` received (unless the record carries that key itself);
- `moe/block_<i>/entropy`, `imbalance` (max/mean tokens per expert), `dropped`: per MoE layer;
  `moe/block_<i>/expert_load`: the layer's tokens per expert as a histogram whose bucket e is expert e, so
  TensorBoard's histogram view shows the load moving between experts over training (rank 0's tokens of the
  interval, as in `metrics.jsonl`);
- `eval/top1`, `eval/top5`, `eval/loss`, `eval/images`: each evaluation;
- `checkpoint/seconds`; `events/<name>`: how many times the warning `<name>` has happened (TensorBoard also gets
  one text line per event under `events`);
- images under the tag they are given (`Metrics.on_image`), e.g. `routing/block_<i>` at each evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

SKIPPED_KEYS = ("step", "time", "moe")


class TrackerSink:
    """The sink part shared by the TensorBoard and W&B sinks; a subclass writes what this computes.

    Subclasses implement `write(step, scalars, histograms)`, `write_text(step, tag, text)`,
    `write_image(step, tag, rgb)` and `close()`.
    """

    name = "tracker"
    accepts_images = True

    def __init__(self, start_step: int = 0) -> None:
        self._step = start_step
        self._steps = 0  # on_step calls since the last on_log
        self._alltoall_seconds = 0.0
        self._events: dict[str, int] = {}

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None:
        self._step = step
        self._steps += 1
        self._alltoall_seconds += alltoall_seconds

    def on_log(self, record: Mapping[str, Any]) -> None:
        step = _step_of(record, self._step)
        scalars: dict[str, float] = {}
        _flatten("train", {k: v for k, v in record.items() if k not in SKIPPED_KEYS}, scalars)
        if self._steps and "alltoall_seconds" not in record:
            scalars["train/alltoall_seconds"] = self._alltoall_seconds / self._steps
        self._steps, self._alltoall_seconds = 0, 0.0
        histograms: dict[str, np.ndarray] = {}
        moe = record.get("moe")
        for layer, stats in moe.items() if isinstance(moe, Mapping) else ():
            if not isinstance(stats, Mapping):
                continue
            prefix = f"moe/block_{layer}"
            tokens = stats.get("tokens")
            if isinstance(tokens, (list, tuple)) and tokens and all(_is_number(t) for t in tokens):
                histograms[f"{prefix}/expert_load"] = np.asarray(tokens, dtype=np.float64)
                if "imbalance" not in stats and sum(tokens) > 0:
                    scalars[f"{prefix}/imbalance"] = max(tokens) / (sum(tokens) / len(tokens))
            for key in ("entropy", "imbalance", "dropped"):
                if _is_number(stats.get(key)):
                    scalars[f"{prefix}/{key}"] = float(stats[key])
        self.write(step, scalars, histograms)

    def on_eval(self, record: Mapping[str, Any]) -> None:
        step = _step_of(record, self._step)
        values = {k.removeprefix("eval_"): v for k, v in record.items() if k not in SKIPPED_KEYS}
        scalars: dict[str, float] = {}
        _flatten("eval", values, scalars)
        self.write(step, scalars, {})

    def on_checkpoint(self, step: int, seconds: float) -> None:
        self.write(step, {"checkpoint/seconds": float(seconds)}, {})

    def on_event(self, name: str, **fields: Any) -> None:
        step = fields.pop("step", None)
        step = step if isinstance(step, int) and not isinstance(step, bool) else self._step
        self._events[name] = self._events.get(name, 0) + 1
        self.write(step, {f"events/{name}": float(self._events[name])}, {})
        detail = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        self.write_text(step, "events", f"step {step}: {name} {detail}".rstrip())

    def on_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.write_image(step, tag, image)

    # --- what a tracker implements

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        """Scalars and per-expert histograms (bucket e holds expert e's count) of one step."""
        raise NotImplementedError

    def write_text(self, step: int, tag: str, text: str) -> None:
        raise NotImplementedError

    def write_image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """`rgb`: uint8 [H, W, 3]."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _step_of(record: Mapping[str, Any], default: int) -> int:
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else default


def _flatten(prefix: str, values: Mapping[str, Any], out: dict[str, float]) -> None:
    """Numbers of `values` (nested mappings too) as `prefix/key[/sub...]`; NaN and inf are kept (a NaN loss is news)."""
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if _is_number(value):
            with contextlib.suppress(OverflowError):  # an int beyond float range is no curve
                out[name] = float(value)
        elif isinstance(value, Mapping):
            _flatten(name, value, out)
