"""Counting bad samples, warning about them without flooding the log, and stopping past a threshold.

A corrupt image, a truncated or unreadable shard, a sample without a label: the sample is skipped, counted, and a
warning names the shard and the key. Warnings are rate limited (the first few individually, then one summary per
interval), and counting never depends on the warning being shown, so nothing is lost silently. Unlike webdataset's
`warn_and_continue` (which sleeps half a second per error) or `ignore_and_continue` (which counts nothing), this
keeps going at full speed and keeps the count.
"""

from __future__ import annotations

import logging
import time

from vimoe_dist.errors import UserError

log = logging.getLogger("vimoe_dist.data")

# The fraction is not judged on fewer samples: one bad image among the first ten is not 10% of a data set.
MIN_SAMPLES_FOR_FRACTION = 100


class BadSample(Exception):
    """A sample that cannot be used; carries where it came from."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"{shard}: {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


class BadDataLog:
    """Counts bad samples in one worker and emits rate-limited warnings.

    Args:
        where: names the stream in messages (e.g. "train rank 1 worker 0").
        burst: warnings shown one by one before rate limiting starts.
        interval_s: afterwards, at most one summary warning per interval.
    """

    def __init__(self, where: str, burst: int = 5, interval_s: float = 30.0) -> None:
        self.where = where
        self.burst = burst
        self.interval_s = interval_s
        self.num_bad = 0
        self._taken = 0
        self._shown = 0
        self._suppressed = 0
        self._last_warn = 0.0

    def record(self, shard: str, key: str, reason: str, count: int = 1) -> None:
        self.num_bad += count
        now = time.monotonic()
        if self._shown < self.burst or now - self._last_warn >= self.interval_s:
            more = f" ({self._suppressed} more bad samples since the last warning)" if self._suppressed else ""
            log.warning("bad data in %s: shard %s key %s: %s; skipped%s", self.where, shard, key, reason, more)
            self._shown += 1
            self._suppressed = 0
            self._last_warn = now
        else:
            self._suppressed += count

    def take(self) -> int:
        """Bad samples recorded since the previous call."""
        delta = self.num_bad - self._taken
        self._taken = self.num_bad
        return delta


def check_bad_fraction(num_bad: int, num_read: int, max_fraction: float, where: str, final: bool = False) -> None:
    """Raises `UserError` when more than `max_fraction` of the samples read were bad (data.max_bad_fraction)."""
    if num_bad == 0:
        return
    judged = final or max_fraction == 0 or num_read >= MIN_SAMPLES_FOR_FRACTION
    if judged and num_bad > max_fraction * max(num_read, 1):
        raise UserError(
            f"{where}: {num_bad} of {num_read} samples were bad ({num_bad / max(num_read, 1):.1%}), more than "
            f"data.max_bad_fraction={max_fraction}; see the warnings above for shards and keys"
        )
