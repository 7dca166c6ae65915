"""The run directory holds one job at a time, and only its own run.

- **One job per run directory.** Rank 0 takes an exclusive lock on `RUN/.lock` right after the rendezvous and holds
  it for the life of its process; the kernel drops it when the process ends, however it ends (kill -9 included), so
  there is no stale lock to clean up. A second job on the same `run.out_dir` exits 2 naming the holder (host, pid,
  Slurm job id, start time, written into the lock file). Every rank learns rank 0's verdict in one collective, so no
  rank of a refused job waits for anything. Other files in the directory (`launch/job.json`, written by `vimoe
  launch hostfile` before any rank starts) are no conflict: only the lock counts.
- **Files of the run written whole**: `config.yaml` and `deepspeed_config.json` go through a temporary file and a
  rename, only once the checkpoint to resume has been accepted (a resume refused for another model leaves the old
  `config.yaml`, which eval and analysis read); a full disk is one line on every rank.
- **A resumed model that changed** (router, top_k, capacity, ... as long as the weights fit) is one warning naming
  each changed key, read against the config of the run that wrote the checkpoint.

The lock is a POSIX record lock (`fcntl.lockf`), not `flock`: it is not inherited by forked DataLoader workers (a
worker that outlives a killed rank by a few seconds would still hold a `flock`), and it is the lock NFS implements
(through its lock manager), so a multi-node job works when the run directory is on shared storage that supports
locks (NFSv3 with lockd, NFSv4, Lustre mounted with `flock`). On a file system without locks the job goes on with one
warning. The `filelock` package is no fit: it uses `flock` and truncates the file it opens, which would erase the
holder's details. A POSIX lock is dropped when this process closes *any* descriptor of the file: nothing else in the
trainer opens it, and a process takes it once (`_held`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml

from vimoe_dist.atomic import write_atomic
from vimoe_dist.config import Config, load_config, to_dict
from vimoe_dist.data.check import CLASSES_FILE
from vimoe_dist.errors import UserError

log = logging.getLogger("vimoe.train")

LOCK_FILE = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # the file system has no record locks
_held: dict[Path, int] = {}  # run directory -> descriptor of its lock file, for the life of the process


def claim_run_dir(out_dir: str | Path, rank: int) -> None:
    """Rank 0 locks the run directory for this job (creating it); every rank raises the same one-line error when it
    cannot. A collective: call it on every rank, after the rendezvous.

    Raises:
        UserError: another job holds the directory (naming it), or rank 0 cannot create or lock it.
    """
    from vimoe_dist.parallel import collectives  # torch: imported where needed (prune writes files through here)

    error = None
    if rank == 0:
        try:
            _lock(Path(out_dir))
        except UserError as e:
            error = str(e)
    error = collectives.all_gather_object(error)[0]
    if error:
        raise UserError(error)


def _lock(run_dir: Path) -> None:
    key = run_dir.resolve()
    if key in _held:
        return
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"run.out_dir: cannot write to {str(run_dir)!r} ({e.strerror or e})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise UserError(
                f"run.out_dir: {str(run_dir)!r} is in use by another job ({holder}); one job per run directory: "
                "wait for that job to end, or choose another run.out_dir"
            ) from None
        if e.errno in NO_LOCKS:
            log.warning("run.out_dir: the file system of %s has no file locks (%s): nothing stops a second job on "
                        "this run directory", run_dir, e.strerror)  # fmt: skip
            return
        raise UserError(f"run.out_dir: cannot lock {str(path)!r} ({e.strerror or e})") from None
    _held[key] = fd
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with contextlib.suppress(OSError):  # the details are a courtesy: a full disk must not fail the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    """The holder's details as written by `_lock`, for the refusal message."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        parts = [f"host {info['host']}", f"pid {info['pid']}"]
    except (OSError, ValueError, TypeError, KeyError):
        return "holder unknown: it is starting or wrote no details"
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(str(p) for p in parts)


def write_run_file(path: Path, text: str) -> None:
    """`path` holds the old content or the whole new one, never a torn file; no temporary file is left behind.

    Raises:
        UserError: naming the file and the reason (a full disk, a read-only file system, ...).
    """
    try:
        write_atomic(path, text, durable=True)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r} ({e.strerror or e})") from None


def write_run_classes(run_dir: Path, classes: list[str]) -> Path | None:
    """`RUN/classes.txt`, line i naming class i, when the data set's manifests name the classes (their names were
    checked when the manifests were read): `vimoe eval` and `vimoe analyze` name classes by it, also once the data
    set has moved."""
    if not classes:
        return None
    write_run_file(run_dir / CLASSES_FILE, "".join(f"{name}\n" for name in classes))
    return run_dir / CLASSES_FILE


def write_run_files(
    cfg: Config, run_dir: Path, world_size: int, resumed: tuple[Path, str] | None, classes: list[str] = ()
) -> None:
    """The resolved `config.yaml`, `deepspeed_config.json` and the data set's `classes.txt` (rank 0), once the
    checkpoint to resume from has been accepted (a refused start changes no file); before, a warning naming what
    changed in the model since the checkpoint's run. A collective: every rank raises the same one-line error when
    rank 0 cannot write.

    Raises:
        UserError: rank 0 cannot write a file (naming it and the reason).
    """
    from vimoe_dist.parallel import collectives
    from vimoe_dist.parallel.ds_config import build_ds_config

    error = None
    if collectives.rank() == 0:
        if resumed is not None:
            warn_model_changes(cfg, resumed)
        try:
            write_run_file(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            write_run_file(run_dir / "deepspeed_config.json", json.dumps(build_ds_config(cfg, world_size), indent=2))
            write_run_classes(run_dir, classes)
        except UserError as e:
            error = str(e)
    error = collectives.all_gather_object(error)[0]
    if error:
        raise UserError(f"run.out_dir: {error}")


def warn_model_changes(cfg: Config, resumed: tuple[Path, str]) -> list[str]:
    """One warning naming every `model.*` key that differs from the config of the run that saved the checkpoint
    (`<run>/config.yaml` next to its `checkpoints/`); its weights fit this model, or the resume would have failed.
    Returns the changes ("key: old -> new")."""
    root, tag = resumed
    old_path = Path(root).parent / "config.yaml"
    if not old_path.is_file():
        return []
    try:
        old = to_dict(load_config(old_path)).get("model", {})
    except UserError as e:  # a config of another version of vimoe-dist: nothing to compare against
        log.debug("not comparing with %s: %s", old_path, e)
        return []
    changes = [
        f"model.{key}: {_show(before)} -> {_show(after)}"
        for key, before, after in _differences(old, to_dict(cfg).get("model", {}))
        if key != "pretrained"  # read only when a run starts from scratch
    ]
    if changes:
        log.warning("resuming %s with a changed model (%s); the weights fit and training goes on with the new settings",
                    tag, ", ".join(changes))  # fmt: skip
    return changes


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
