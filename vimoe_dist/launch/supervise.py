"""Running a launcher as a child: its exit status becomes ours, and SIGINT, SIGTERM or SIGHUP reach its ranks once.

Why not exec the launcher: Ctrl-C sends SIGINT to the whole foreground process group, so the deepspeed runner
(which has no handler when it launches locally) died with a KeyboardInterrupt traceback, and every rank got SIGINT
from the terminal and a SIGTERM from `deepspeed.launcher.launch` right after, two stop signals where the trainer
expects one. Here the launcher runs in its own session, out of reach of the terminal, and a stop signal is passed
on once, as SIGTERM (every launcher and the trainer read it as "checkpoint and stop", and it ends a Python process
that has no handler yet without a traceback), to the process that stops the ranks cleanly:

- `deepspeed.launcher.launch` (the runner's child when it starts the ranks on this node): it sends SIGTERM to
  every rank, waits 30 s for the checkpoint, then SIGKILL, and exits 1;
- the deepspeed runner itself with the pdsh backend: its handler stops pdsh and runs `pkill` on every node;
- the runner's child with the other backends (mpirun, srun), which pass signals to their remote ranks;
- the launcher itself otherwise (torchrun via `vimoe_dist.parallel.torchrun`, sbatch).

Then the wait is bounded: after `grace_s` seconds, or at a second signal, the launcher and all its descendants are
killed.
`vimoe launch` ends with one line naming the signal, and exit 128+N.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vimoe_dist.errors import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEFAULT_GRACE_S = 90.0  # above the launchers' own 30 s before SIGKILL


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, from /proc (Linux); empty where /proc is not there."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # the command name in (...) may contain spaces and parentheses: the fields after the last ')' are fixed
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def deepspeed_targets(runner: int, backend: str) -> list[int]:
    """Where a stop signal goes for the deepspeed runner `runner` (see the module docstring)."""
    kids = children(runner)
    local = [pid for pid in kids if "deepspeed.launcher.launch" in cmdline(pid)]
    if local:
        return local
    if backend == "pdsh" or not kids:
        return [runner]
    return kids


def run_supervised(
    cmd: Sequence[str],
    *,
    name: str,
    env: Mapping[str, str] | None = None,
    targets: Callable[[int], list[int]] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> int:
    """Runs `cmd` in its own session and returns its exit status (128+N when a signal N stopped it).

    Args:
        name: the launcher in messages (`deepspeed`, `torchrun`, `sbatch`).
        env: the child's environment (default: ours).
        targets: pids to signal given the child's pid (default: the child).

    Raises:
        UserError: `cmd[0]` cannot be started.
    """
    stopped: list[int] = []

    def on_signal(signum: int, frame) -> None:
        stopped.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        try:
            proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env), start_new_session=True)
        except OSError as e:
            raise UserError(f"cannot run {cmd[0]}: {e.strerror}") from None
        forwarded = 0
        deadline = None
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if len(stopped) > forwarded:
                if forwarded == 0:
                    for pid in targets(proc.pid) if targets else [proc.pid]:
                        _kill(pid, signal.SIGTERM)
                    deadline = time.monotonic() + grace_s
                    forwarded = 1
                else:  # a second stop signal: no more waiting
                    deadline = time.monotonic()
                    forwarded = len(stopped)
            if deadline is not None and time.monotonic() >= deadline:
                _kill_tree(proc.pid)
                code = proc.wait()
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        sig = signal.Signals(stopped[0])
        how = "exited" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
        sys.stderr.write(f"vimoe launch: stopped by {sig.name}: told {name} to stop, and it {how} (status {code})\n")
        sys.stderr.flush()
        return 128 + sig.value
    return code if code >= 0 else 128 - code


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, nearest first."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop(0))
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL to the launcher's process group and to every descendant, which torchrun's workers (each in its own
    session) are not part of."""
    tree = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in tree:
        _kill(child, signal.SIGKILL)
