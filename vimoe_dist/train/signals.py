"""Stop signals: SIGUSR1 (Slurm's `--signal=USR1@grace`), SIGTERM (torchrun's and Kubernetes' stop, Slurm's scancel,
`vimoe launch` passing on a Ctrl-C) and SIGINT (Ctrl-C in the terminal of a plain `vimoe train`).

Once the job has taken a finite step there is something to save: the handler only sets a flag, the loop checks it
at step boundaries, the ranks agree on it (one rank may get the signal first), save together and exit, with
EXIT_REQUEUE (75) so that the batch script requeues the job, or with 130 after a Ctrl-C. A second Ctrl-C exits at
once (the checkpoint being written is then not counted: the previous one stays the latest, train/checkpoint.py).

Before that (the rendezvous, building the model, loading weights, waiting for the first batch, or while every step
so far had a non-finite loss) there is nothing to save, and a stop signal ends the process at once, wherever it is:
143 for SIGTERM, 130 for SIGINT, EXIT_REQUEUE for SIGUSR1 (the scheduler's time limit: requeue). The main thread may
then be blocked for minutes inside C code that never returns to the interpreter (a rendezvous, a collective, a read),
where a Python handler would only run once it returns; so the signal also wakes a watcher thread
(`signal.set_wakeup_fd`: the C-level handler writes the signal number to a pipe), which exits the process itself.

The grace the scheduler gives (Slurm `--signal=USR1@120`, torchrun's 30 s before SIGKILL) must cover the rest of one
step plus one checkpoint; the log says how long it took. DataLoader workers ignore these signals (data/loader.py; a
forked worker also leaves the watcher's pipe alone, `_after_fork_in_child`), so a signal sent to the whole process
group reaches the rank without killing its workers first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

log = logging.getLogger("vimoe.train")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later", the sbatch template requeues on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int | None) -> int:
    """The exit code after a checkpoint forced by `signum`: 130 after a Ctrl-C, else EXIT_REQUEUE."""
    return 128 + signal.SIGINT if signum == signal.SIGINT else EXIT_REQUEUE


class StopRequest:
    """The stop signals of this process (see the module docstring); one per process, made in the main thread."""

    def __init__(self, rank: int = 0, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.rank = rank
        self.signal_name: str | None = None
        self.signum: int | None = None
        self.received_at: float | None = None
        self.armed = False  # a finite step was taken: a stop signal now checkpoints
        self._interrupts = 0
        self._signals = tuple(int(s) for s in signals)
        for sig in signals:
            signal.signal(sig, self._handle)
        _watch(self)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:  # the first one says how to exit (a later SIGTERM of the scheduler changes nothing)
            self.signal_name, self.signum = signal.Signals(signum).name, signum
            self.received_at = time.monotonic()

    def arm(self) -> None:
        """From now on a stop signal checkpoints the run (called once a finite step is taken)."""
        self.armed = True

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float:
        """Seconds since the first signal (0 on a rank that learned of the request from another rank)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    def on_signal(self, signum: int) -> None:
        """The watcher thread's decision, for each stop signal as it arrives: exit now, or leave it to the loop."""
        if signum not in self._signals:
            return
        name = signal.Signals(signum).name
        if not self.armed:  # SIGUSR1 is the scheduler's "time is up": requeue (the sbatch template does on 75)
            code = EXIT_REQUEUE if signum == signal.SIGUSR1 else 128 + signum
            _exit_now(self.rank, code, f"{name} before the first finite step: nothing to save")
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                _exit_now(self.rank, 128 + signum, "second SIGINT: exiting without waiting for the checkpoint")


def _exit_now(rank: int, code: int, why: str) -> None:
    log.warning("rank %d: %s; exit code %d", rank, why, code)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # a closed stream must not keep the process alive
            handler.flush()
    os._exit(code)


# --- the watcher thread: one per process, reading the signal numbers the C-level handler writes to a pipe

_current: StopRequest | None = None
_pipe: tuple[int, int] | None = None


def _watch(request: StopRequest) -> None:
    global _current, _pipe
    _current = request
    if _pipe is not None:
        return
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_fd, False)  # the C handler must never block
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _pipe = (read_fd, write_fd)
    threading.Thread(target=_watcher, args=(read_fd,), name="vimoe-stop-signals", daemon=True).start()
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _watcher(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if _current is not None:
                _current.on_signal(signum)


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) has no watcher thread and must not write into the parent's pipe: a
    Ctrl-C reaching the whole process group would otherwise count as a second one of the parent's."""
    global _current, _pipe
    if _pipe is None:
        return
    signal.set_wakeup_fd(-1)
    for fd in _pipe:
        os.close(fd)
    _current, _pipe = None, None
