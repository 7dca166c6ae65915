"""Files that their readers see whole or not at all.

Prometheus re-reads its targets file whenever it changes, a resumed run reads `latest` and its state files, the
ranks of a job read the job file, `vimoe eval` reads `classes.txt`: each of those files is written beside itself
under a hidden temporary name and renamed over the old one, so a reader, a crash or a full disk never leaves half a
file under the real name, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o666, durable: bool = False) -> None:
    """Writes `data` (str as UTF-8) to `path` through `.NAME.tmpPID` beside it, created afresh (never through a
    symlink planted under the temporary name) with permission bits `mode` (less the umask: 0o600 for a file holding
    secrets), then renamed over `path`.

    `durable`: the file and its directory are fsynced before returning, so the new file survives a power loss too
    (checkpoint markers, the run's own files); without it the rename alone keeps readers from a torn file.

    Raises:
        OSError: the write or the rename failed (the temporary file is gone, `path` is as it was).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a killed writer of the same pid (a container restarts with small pids)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
