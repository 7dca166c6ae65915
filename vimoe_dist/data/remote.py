"""Reading `http(s)://` shards within a total time limit.

webdataset opens URLs with `curl --connect-timeout 30 --retry 30`: a server that accepts a connection and never
answers keeps the reader (and a DataLoader worker, which ignores SIGTERM by design) waiting forever, and a curl child
outlives a rank killed by a signal. Here the shard is read in-process with Python's `urllib`: every socket operation
has a stall timeout (no byte for 30 s), the whole shard a deadline (`data.http_timeout_s`, checked between socket
reads, so a read ends at most one stall timeout after it), and the process's own death closes the connection.
Connection failures and 5xx/429 answers are retried with backoff while the deadline allows; any other failure is
an `OSError` naming the URL, which the shard reader counts as an unreadable shard.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

STALL_S = 30.0  # no byte for this long: the server is gone
RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_ATTEMPTS = 3
_CHUNK = 1 << 16


class HttpShard:
    """A readable binary stream of one URL that raises `TimeoutError` once `timeout_s` have passed since opening."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.response = self._open()

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.url}: not read within data.http_timeout_s={self.timeout_s:g}")
        return min(left, STALL_S)

    def _open(self):
        for attempt in range(MAX_ATTEMPTS):
            try:
                return urllib.request.urlopen(self.url, timeout=self._left())
            except urllib.error.HTTPError as e:
                e.close()
                if e.code not in RETRY_STATUS or attempt == MAX_ATTEMPTS - 1:
                    raise OSError(f"{self.url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or attempt == MAX_ATTEMPTS - 1:
                    raise OSError(f"{self.url}: {reason}") from None
            time.sleep(min(2.0**attempt, max(self.deadline - time.monotonic(), 0)))
        raise AssertionError("unreachable")

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all when n < 0); each socket read is bounded by the stall timeout and the deadline."""
        chunks, need = [], n if n >= 0 else float("inf")
        while need > 0:
            self._left()
            chunk = self.response.read1(int(min(need, _CHUNK)))
            if not chunk:
                break
            chunks.append(chunk)
            need -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> HttpShard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))
