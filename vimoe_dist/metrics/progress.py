"""Progress on the console: a tqdm bar on a terminal, plain lines elsewhere (a Slurm or CI log).

`ProgressSink` is rank 0's training progress. `Progress` / `track` serve every other long loop (evaluation,
`vimoe analyze routing`, `vimoe prune`, `vimoe study`): a bar on a terminal, and in a log one line when the loop
starts, at most one line every `LINE_EVERY_S` seconds, and one when it ends:
`analyze routing: 120/500 batches (24%), 3.1 batches/s, eta 0:02:01`.

On a terminal the bar moves every step (tqdm redraws at most every 0.1 s, so a step costs a counter increment) and
its postfix carries the last logged loss, images/s and learning rate; tqdm gives the ETA. In a Slurm or CI log a
redrawn bar turns into one endless line of carriage returns, so there the sink prints one line per `on_log`
instead: `step 120/1000 loss 1.234 lr 3.0e-04 img/s 512 tflop/s 96.2 mfu 9.7% mem 31.4GiB eta 0:07:21` (the
efficiency figures when the record has them: MFU needs a known peak, memory a GPU).
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
LINE_EVERY_S = 30.0  # plain lines in a log: at most one per this many seconds, besides the first and the last


def track(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "batch", **kwargs: Any
) -> Iterator[T]:
    """Yields the items of `iterable` while showing progress (see `Progress` for `kwargs`); `total` defaults to
    `len(iterable)` when it has one.

        for batch in track(loader, "eval", enabled=rank == 0):
            ...
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit, **kwargs) as progress:
        for item in iterable:
            yield item
            progress.update()


class Progress:
    """Progress of one long loop.

    Args:
        total: the number of items, None when unknown.
        desc: what is being done; starts every line (`analyze routing`).
        unit: what one item is, singular (`batch`).
        stream: where to write (stderr by default).
        bar: draw a tqdm bar; None decides by whether `stream` is a terminal.
        every_s: plain lines at most this often (0: a line per update).
        enabled: False shows nothing (ranks other than 0).
        clock: seconds, monotonic (a parameter for tests).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "batch",
        stream: TextIO | None = None,
        bar: bool | None = None,
        every_s: float = LINE_EVERY_S,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s, self.clock = total, desc, unit, every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self.t0 = self.last_line = clock()
        self._bar = None
        self._closed = not enabled
        if not enabled:
            return
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        if bar:
            from tqdm import tqdm

            # leave=None: kept when it is the only bar, cleared when nested (an evaluation under the training bar)
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=None)
        else:
            count = f", {total} {_plural(unit, total)}" if total is not None else ""
            self._print(f"{desc}: starting{count}")

    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s and self.done != self.total:
            self.last_line = now
            self._print(self._line(now))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        elapsed = self.clock() - self.t0
        rate = f" ({self.done / elapsed:.3g} {self.unit}/s)" if elapsed > 0 and self.done else ""
        of = f"/{self.total}" if self.total is not None else ""
        duration = datetime.timedelta(seconds=round(elapsed))
        self._print(f"{self.desc}: {self.done}{of} {_plural(self.unit, self.done)} in {duration}{rate}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, now: float) -> str:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}"]
        if self.total is not None:
            parts[0] += f"/{self.total} {_plural(self.unit, self.total)}"
            if self.total:
                parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        else:
            parts[0] += f" {_plural(self.unit, self.done)}"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total is not None and rate > 0:
            parts.append(f"eta {datetime.timedelta(seconds=round((self.total - self.done) / rate))}")
        return ", ".join(parts)

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")  # one write: ranks may share the stream
        self.stream.flush()


def _plural(unit: str, count: int | None) -> str:
    if count == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


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

    def on_image(self, tag: str, image: Any, step: int) -> None:
        pass

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
    """loss, lr, images/s, then the efficiency figures a record has: achieved TFLOP/s per device, MFU and the peak GPU
    memory of the interval."""
    names = (("loss", "loss"), ("lr", "lr"), ("images_per_sec", "img/s"), ("achieved_tflops", "tflop/s"),
             ("mfu", "mfu"), ("gpu_peak_allocated_bytes", "mem"))  # fmt: skip
    return " ".join(f"{label} {_fmt(record[key], key)}" for key, label in names if record.get(key) is not None)


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key == "lr":
            return f"{value:.1e}"
        if key == "images_per_sec":
            return f"{value:.0f}"
        if key == "mfu":
            return f"{100 * value:.1f}%"
        if key.endswith("_bytes"):
            return f"{value / 2**30:.1f}GiB"
        if key == "achieved_tflops":
            return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
