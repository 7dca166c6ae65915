"""What rank 0 shows on the console: a tqdm bar on a terminal, one plain line per log interval elsewhere.

On a terminal the bar moves every step (tqdm redraws at most every 0.1 s, so a step costs a counter increment) and
its postfix carries the last logged loss, images/s and learning rate; tqdm gives the ETA. In a Slurm or CI log a
redrawn bar turns into one endless line of carriage returns, so there the sink prints one line per `on_log`
instead: `step 120/1000 loss 1.234 lr 3.0e-04 img/s 512 eta 0:07:21`.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


class ProgressSink:
    """Console progress of rank 0.

    Args:
        total_steps: `train.steps`.
        start_step: the step a resumed run starts from.
        stream: where to write (stderr by default).
        bar: draw a tqdm bar; None decides by whether `stream` is a terminal.
    """

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.start_step, self.step = total_steps, start_step, start_step
        self.t0 = time.monotonic()
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True,
                desc="train", smoothing=0.1,
            )  # fmt: skip

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None:
        if self._bar is not None:
            self._bar.update(step - self.step)
        self.step = step

    def on_log(self, record: Mapping[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(_fields(record), refresh=False)
            return
        step = record.get("step", self.step)
        self._print(f"step {step}/{self.total} {_fields(record)} eta {self._eta(step)}")

    def on_eval(self, record: Mapping[str, Any]) -> None:
        parts = [f"{k.removeprefix('eval_')} {_fmt(v)}" for k, v in record.items() if k != "step"]
        self._print(f"eval @ step {record.get('step', self.step)}: {' '.join(parts)}")

    def on_checkpoint(self, step: int, seconds: float) -> None:
        self._print(f"checkpoint @ step {step} saved in {seconds:.1f}s")

    def on_event(self, name: str, **fields: Any) -> None:
        detail = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        self._print(f"warning: {name} {detail}".rstrip())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.monotonic() - self.t0) / done * max(self.total - step, 0)
        return str(datetime.timedelta(seconds=round(left)))

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


def _fields(record: Mapping[str, Any]) -> str:
    names = (("loss", "loss"), ("lr", "lr"), ("images_per_sec", "img/s"))
    return " ".join(f"{label} {_fmt(record[key], key)}" for key, label in names if record.get(key) is not None)


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{value:.1e}"
        if key == "images_per_sec":
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)
