"""Preemption: SIGUSR1 (Slurm's `--signal=USR1@grace`) or SIGTERM asks for a checkpoint and a clean exit.

The handler only sets a flag; the loop checks it at step boundaries, the ranks agree on it (one rank may get the
signal first), save together, and exit with EXIT_REQUEUE so the batch script knows to requeue the job.
"""

from __future__ import annotations

import signal

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later", the sbatch template requeues on it


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
