"""Preemption: SIGUSR1 (Slurm's `--signal=USR1@grace`) or SIGTERM (torchrun's and Kubernetes' stop, Slurm's
scancel) asks for a checkpoint and a clean exit.

The handler only sets a flag; the loop checks it at step boundaries, the ranks agree on it (one rank may get the
signal first), save together, and exit with EXIT_REQUEUE so the batch script knows to requeue the job. The grace the
scheduler gives (Slurm `--signal=USR1@120`, torchrun's 30 s before SIGKILL) must cover the rest of one step plus one
checkpoint; the log says how long it took. DataLoader workers ignore both signals (data/loader.py), so a signal sent
to the whole process group reaches the rank without killing its workers first.
"""

from __future__ import annotations

import signal
import time

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later", the sbatch template requeues on it


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.signal_name: str | None = None
        self.received_at: float | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self.received_at is None:
            self.received_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float:
        """Seconds since the first signal (0 on a rank that learned of the request from another rank)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0
