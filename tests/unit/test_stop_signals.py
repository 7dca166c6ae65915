"""Stop signals (vimoe_dist/train/signals.py) in a process whose main thread is blocked inside C code (a read that
never returns, as a rendezvous, a collective or a stuck data read would be), where a Python handler alone never
runs to completion of anything:

- before the first finite step (nothing to save) SIGTERM and SIGINT end the process at once with 128+N, SIGUSR1
  (Slurm's time limit) with 75 for a requeue;
- after it, one SIGINT only asks for a checkpoint (the process goes on), a second one exits at once with 130;
- a Ctrl-C that also reaches a forked DataLoader worker is not counted as a second one of the parent's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKED = """
import os, signal, sys, time
from vimoe_dist.train.signals import StopRequest
stop = StopRequest(rank=3)
if "armed" in sys.argv:
    stop.arm()
if "fork" in sys.argv and os.fork() == 0:  # a DataLoader worker getting the terminal's Ctrl-C too
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
    os._exit(0)
print("ready", flush=True)
os.read(os.pipe()[0], 1)  # blocked in C forever
"""


def _start(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _exit_within(proc: subprocess.Popen, seconds: float) -> int | None:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_nothing_to_save_exits_at_once_even_when_blocked(sig):
    proc = _start()
    try:
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = 75 if sig == signal.SIGUSR1 else 128 + sig  # SIGUSR1: Slurm's time limit, requeue
        assert _exit_within(proc, 20) == code
        assert time.monotonic() - t0 < 20
        name = signal.Signals(sig).name
        assert proc.stderr.read().strip().splitlines() == [
            f"rank 3: {name} before the first finite step: nothing to save; exit code {code}"
        ]
    finally:
        proc.kill()
        proc.wait()


def test_a_second_ctrl_c_exits_at_once_the_first_asks_for_a_checkpoint():
    proc = _start("armed")
    try:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)  # a scheduler's stop on top changes nothing either
        assert _exit_within(proc, 3) is None  # the loop would checkpoint at its next step boundary
        proc.send_signal(signal.SIGINT)
        assert _exit_within(proc, 20) == 130
        assert "second SIGINT: exiting without waiting for the checkpoint; exit code 130" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_forked_workers_ctrl_c_is_not_the_parents():
    proc = _start("armed", "fork")
    try:
        time.sleep(2)  # the child has sent itself SIGINT and exited
        proc.send_signal(signal.SIGINT)  # the parent's first
        assert _exit_within(proc, 3) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_child_process_does_not_inherit_the_pipe():
    code = "import os; print(sorted(os.listdir('/proc/self/fd')))"
    probe = (
        "import subprocess, sys; from vimoe_dist.train.signals import StopRequest; StopRequest(); "
        f"print(subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True).stdout)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "['0', '1', '2', '3']", out  # stdio and listdir's own descriptor only
