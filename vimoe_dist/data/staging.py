"""Writing a data set over an existing one without ever leaving a broken one: the new files go to a staging folder
beside the old ones and replace them only when every shard and manifest is complete.

`vimoe data ... --out DIR` used to delete the old shards first, so Ctrl-C left new shards, a stale manifest and
`.tmp` files. Now, while a write runs, `DIR` holds the old data set untouched plus a hidden `DIR/.vimoe-partial-PID/`;
SIGINT or SIGTERM (turned into an exception while the write runs) removes the staging folder and leaves `DIR` as it
was. The commit renames the new files into place (shards first, manifests last; a rename within one file system is
atomic) and only then deletes the replaced split's leftover shards; a signal that arrives during the commit is
held until it is done. Splits not being written stay as they are, so train and val can be written by two commands.
An exclusive `flock` on `DIR` keeps two writers apart (and lets a writer remove a staging folder a killed one left).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from vimoe_dist.errors import UserError

STAGING_PREFIX = ".vimoe-partial-"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """SIGTERM during a write: unwinds like Ctrl-C (the staging folder is removed) and exits 128 + signal."""


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(128 + signum)


class StagedWrite:
    """`with StagedWrite(out, splits) as stage:` write into `stage.dir`; on a clean exit the files replace those of
    `splits` (and any other file written) in `out`."""

    def __init__(self, out: str | os.PathLike, splits: Sequence[str]) -> None:
        self.out = Path(out)
        self.splits = list(splits)
        self.dir = self.out / f"{STAGING_PREFIX}{os.getpid()}"
        self._lock: int | None = None
        self._old_term = None

    def __enter__(self) -> StagedWrite:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.out, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot create the directory ({e.strerror or e})") from None
        locked = True
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise UserError(f"--out {self.out}: another `vimoe data` is writing this data set") from None
        except OSError:
            locked = False  # a file system without flock: no protection against a second writer, as before
        if locked:  # what a killed writer left; without the lock it could be a live writer's
            for stale in self.out.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.dir.mkdir()
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                with _held_signals():
                    self._commit()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)

    def _commit(self) -> None:
        new = sorted(p.name for p in self.dir.iterdir() if p.is_file())
        # shards first, manifests last: until the manifest moves, it describes the shards it always did
        for name in sorted(new, key=lambda n: (n.endswith(".json"), n.endswith(".txt"), n)):
            os.replace(self.dir / name, self.out / name)
        for split in self.splits:
            for old in self.out.glob(f"{split}-*.tar*"):
                if old.name not in new:  # shards of the old set beyond the new count, and .tmp files of old writers
                    old.unlink()
            for debris in self.out.glob(f"{split}.json.tmp*"):
                debris.unlink()


@contextlib.contextmanager
def _held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the body is done, then act as they would have (a handler that only records,
    rather than a blocked signal mask: Python runs handlers in the main thread whichever thread the kernel picks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if received:
        handler = old[received[0]]
        if callable(handler):
            handler(received[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(received[0])
