"""Progress of `vimoe data` writers: a tqdm bar on a terminal, plain lines otherwise.

A bar redraws itself with carriage returns, which turn a Slurm log or a CI log into one enormous line; when stderr is
not a terminal, a line is printed at every tenth of the work and at least every minute, and one at the end.
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 60.0


class Progress:
    """Counts `total` units of `what`; `update(n)` after each piece of work, `close()` at the end."""

    def __init__(self, total: int, what: str, unit: str = "img", enabled: bool = True) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.done = 0
        self.enabled = enabled
        self.bar = None
        self.t0 = self.last = time.monotonic()
        self.next_tenth = 1
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        tenth = self.done * 10 // max(self.total, 1)
        if self.enabled and self.done < self.total and (tenth >= self.next_tenth or now - self.last >= LINE_EVERY_S):
            self.next_tenth = tenth + 1
            self._line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        percent = 100 * self.done // max(self.total, 1)
        sys.stderr.write(f"{self.what}: {self.done}/{self.total} {self.unit} ({percent}%), {rate:.0f} {self.unit}/s\n")
        sys.stderr.flush()
