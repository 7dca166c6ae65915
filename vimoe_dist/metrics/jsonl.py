"""`run_dir/metrics.jsonl`: one JSON object per line, written by rank 0 (the run directory contract).

Record kinds, told apart by their keys:
- train (every `train.log_every` steps): `step`, `time`, `loss`, `lr`, `images_per_sec`, `grad_norm`, `step_seconds`,
  `data_wait_seconds`, `bad_samples`, and `moe`: {block index: {`tokens`: [per expert], `dropped`, `entropy`,
  `imbalance`}} - one small object per MoE layer, so a line stays readable;
- eval: `step`, `time`, `eval_top1`, `eval_top5`, `eval_loss`, `eval_images`;
- checkpoint: `step`, `time`, `checkpoint_seconds`;
- event: `step` (when known), `time`, `event` (its name) and the event's own fields.

Non-finite numbers (a NaN loss on a bad step) are written as `null` so the file stays strict JSON for jq and
friends. On a resume from step S, lines with a step above S are dropped when the file is opened: they belong to the
stretch of training that is being redone, and keeping them would draw two curves over the same steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FILENAME = "metrics.jsonl"


class JsonlSink:
    """Appends records to `run_dir/metrics.jsonl`, one line each, flushed as written (a crash loses nothing)."""

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        self.path = Path(run_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _drop_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._step = start_step

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None:
        self._step = step

    def on_log(self, record: Mapping[str, Any]) -> None:
        self._write(record)

    def on_eval(self, record: Mapping[str, Any]) -> None:
        out = {k if k.startswith("eval_") or k in ("step", "time") else f"eval_{k}": v for k, v in record.items()}
        self._write(out)

    def on_checkpoint(self, step: int, seconds: float) -> None:
        self._write({"step": step, "checkpoint_seconds": seconds})

    def on_event(self, name: str, **fields: Any) -> None:
        self._write({"step": fields.pop("step", self._step), "event": name, **fields})

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file.closed:
            return
        line = {"step": record.get("step"), "time": round(time.time(), 3), **record}
        self._file.write(json.dumps(_clean(line), separators=(",", ":"), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a metrics file; a torn last line (the writer was killed mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def _drop_after(path: Path, start_step: int) -> None:
    kept = [r for r in read_jsonl(path) if not isinstance(r.get("step"), int) or r["step"] <= start_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
