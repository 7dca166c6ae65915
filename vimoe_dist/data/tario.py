"""Reading one shard as a stream of samples, keeping track of what a damaged shard loses.

Opening uses webdataset's `gopen` (local files, `pipe:` commands with exit-status checks) and `remote.HttpShard` for
`http(s)://` (a total time limit, which webdataset's curl lacks); file names are split into key and extension by
webdataset's `base_plus_ext`, so keys match what `webdataset.WebDataset` would produce. Members come from our header
reader (`tarformat`, several times faster than `tarfile` on small images). The grouping loop is ours too:
webdataset's `tar_file_expander` hands a truncation error to its handler once per broken member *and* once per
shard, and then merges the broken sample with the next shard's first one, which makes exact counts impossible. Here
a reader yields every sample group it could read completely (a group may still lack a label: the decoder counts that
with its key) and afterwards says how many groups it saw, whether the shard broke, and which sample was being read
when it did.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator

from vimoe_dist.data.baddata import BadDataLog
from vimoe_dist.data.remote import HttpShard, is_http
from vimoe_dist.data.tarformat import iter_members

META_PREFIX = "__"
DEFAULT_HTTP_TIMEOUT_S = 600.0  # data.http_timeout_s


class ShardReader:
    """Iterates the samples of one shard: dicts {`__key__`, `__url__`, ext: bytes}, in tar order.

    After iteration: `num_seen` complete groups yielded, `error` (None or a one-line reason) and `partial_key`
    (the key of the sample lost when the shard broke, or None).
    """

    def __init__(self, url: str, http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S) -> None:
        self.url = url
        self.http_timeout_s = http_timeout_s
        self.num_seen = 0
        self.error: str | None = None
        self.partial_key: str | None = None

    def __iter__(self) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import base_plus_ext

        current: dict | None = None
        stream = None
        closed = False
        try:
            stream = HttpShard(self.url, self.http_timeout_s) if is_http(self.url) else gopen(self.url, "rb")
            for name, data in iter_members(stream, f"in {self.url}"):
                if name.startswith(META_PREFIX):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                if current is None or prefix != current["__key__"]:
                    if current is not None:
                        self.num_seen += 1
                        yield current
                    current = {"__key__": prefix, "__url__": self.url}
                current[suffix.lower()] = data
            closed = True
            stream.close()  # a pipe's exit status is checked here: a failed command is an unreadable shard
            if current is not None:
                self.num_seen += 1
                yield current
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if current is not None:
                self.partial_key = current["__key__"]
        finally:
            if stream is not None and not closed:  # an error, or the consumer stopped early
                with contextlib.suppress(Exception):  # the read error already says what went wrong
                    stream.close()


def account_shard_end(reader: ShardReader, bad: BadDataLog, expected: int | None) -> None:
    """Records the samples a shard lost: its broken sample, and (when the manifest says how many it holds) the
    rest; without a manifest a broken shard counts at least one lost sample."""
    url = reader.url
    if reader.error is None:
        if expected is not None and reader.num_seen < expected:
            bad.record(
                url, "-", f"shard ended after {reader.num_seen} of {expected} samples", expected - reader.num_seen
            )
        return
    seen = reader.num_seen
    if reader.partial_key is not None:
        seen += 1
        bad.record(url, reader.partial_key, f"unreadable shard ({reader.error}); sample cut off")
    if expected is not None:
        lost = max(expected - seen, 0)
    else:
        lost = 0 if reader.partial_key is not None else 1
    if lost:
        where = reader.partial_key or "-"
        bad.record(url, where, f"unreadable shard ({reader.error}); {lost} samples lost", lost)
