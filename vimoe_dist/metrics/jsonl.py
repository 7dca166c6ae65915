"""`run_dir/metrics.jsonl`: one JSON object per line, written by rank 0 (the run directory contract).

Record kinds, told apart by their keys:
- train (every `train.log_every` steps): `step`, `time`, `loss`, `lr`, `images_per_sec`, `grad_norm`, `step_seconds`,
  `data_wait_seconds`, `alltoall_seconds`, `tokens_per_sec`, `flops_per_image`, `achieved_tflops`, `mfu` (with a
  known peak), `gpu_allocated_bytes`, `gpu_reserved_bytes`, `gpu_peak_allocated_bytes` (on a GPU), `bad_samples`,
  and `moe`: {block index: {`tokens`: [per expert], `dropped`, `entropy`, `imbalance`}} - one small object per MoE
  layer, so a line stays readable;
- eval: `step`, `time`, `eval_top1`, `eval_top5`, `eval_loss`, `eval_images`;
- checkpoint: `step`, `time`, `checkpoint_seconds`;
- event: `step` (when known), `time`, `event` (its name) and the event's own fields.

Non-finite numbers (a NaN loss on a bad step) are written as `null` so the file stays strict JSON for jq and
friends. On a resume from step S, lines with a step above S are dropped when the file is opened: they belong to the
stretch of training that is being redone, and keeping them would draw two curves over the same steps.

A record is one `write` of a whole line; when the disk is full (or a quota or file size limit is hit) the partial
line is cut off again (`ftruncate` to where the line started), so the file never holds a torn line. The first failed
record logs one warning and training goes on; the sink keeps trying, and the first record that fits again is
preceded by an event record `metrics_records_lost` with the number of records that were not written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vimoe_dist.atomic import write_atomic
from vimoe_dist.errors import UserError

log = logging.getLogger(__name__)

FILENAME = "metrics.jsonl"


class JsonlSink:
    """Appends records to `run_dir/metrics.jsonl`, one line each, written through as they come (a crash loses
    nothing).

    Raises:
        UserError: the file cannot be opened or rewritten (on a resume) in `run_dir`.
    """

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        self.path = Path(run_dir) / FILENAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                _drop_after(self.path, start_step)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{FILENAME}: cannot write {self.path} ({e.strerror or e})") from None
        self._step = start_step
        self._lost = 0  # records not written since the last one that was

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

    def on_image(self, tag: str, image: Any, step: int) -> None:
        pass  # images go to TensorBoard and W&B; a JSON line is no place for pixels

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._fd is None:
            return
        now = round(time.time(), 3)
        data = _line({"step": record.get("step"), "time": now, **record})
        if self._lost:
            data = _line({"step": record.get("step"), "time": now, "event": "metrics_records_lost",
                          "records": self._lost}) + data  # fmt: skip
        start = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, data)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)  # never leave a torn line behind
            if not self._lost:
                log.warning(
                    "%s: cannot write %s (%s); training goes on, and records are dropped until one fits again",
                    FILENAME, self.path, e.strerror or e,
                )  # fmt: skip
            self._lost += 1
            return
        if self._lost:
            log.warning("%s: writing again after %d records were lost", FILENAME, self._lost)
            self._lost = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
    write_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


def _line(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(_clean(record), separators=(",", ":"), default=str) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
