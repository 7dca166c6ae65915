"""One check's answer, and the two ways a check is kept from hanging: a thread with a deadline, or a subprocess
whose whole process group is killed at the deadline (a JIT build's compiler included)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vimoe_dist.errors import UserError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
STATUSES = (OK, WARN, FAIL, SKIP)  # skip: does not apply here (e.g. NCCL on a node without GPUs), with the reason


@dataclass
class Check:
    """The answer of one check: `summary` says what was found, `fix` (for warn and fail) what to do; both one line."""

    name: str
    status: str
    summary: str
    fix: str = ""
    data: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status
        self.summary, self.fix = _one_line(self.summary), _one_line(self.fix)

    def to_dict(self) -> dict:
        return asdict(self)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def bounded(name: str, fn: Callable[[], Check], timeout_s: float) -> Check:
    """Runs `fn` in a daemon thread; past `timeout_s` the check fails (the thread is abandoned, the doctor goes on).

    A `UserError` from `fn` is a fail with its message; any other exception a fail naming its type.
    """
    box: dict[str, Check] = {}

    def target() -> None:
        try:
            box["check"] = fn()
        except UserError as e:
            box["check"] = Check(name, FAIL, str(e), fix="see the message")
        except Exception as e:
            box["check"] = Check(name, FAIL, f"{type(e).__name__}: {e}", fix="see the message")

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, name=f"doctor-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    seconds = time.perf_counter() - t0
    if thread.is_alive():
        return Check(
            name, FAIL, f"no answer within {timeout_s:.0f} s", fix="something on this node hangs: see the check's docs"
        )
    check = box["check"]
    check.seconds = round(seconds, 3)
    return check


class Subprocess:
    """A Python child (`python ARGS --out FILE`, e.g. `-m vimoe_dist.parallel.probe torch`) that writes one JSON
    object to FILE.

    Started at once, collected later, so that slow probes run side by side. It runs in its own session: at the
    deadline the whole process group is killed, a compiler started by a JIT build included.
    """

    def __init__(self, args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> None:
        self.timeout_s = timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="vimoe-doctor-")
        self.out = Path(self._dir.name) / "out.json"
        self.log = open(Path(self._dir.name) / "log.txt", "w+b")  # noqa: SIM115 - closed in result()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, *args, "--out", str(self.out)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def result(self) -> tuple[dict | None, str]:
        """(the child's JSON, "") or (None, why not: a timeout, an exit status with the log's last line)."""
        remaining = max(0.0, self.timeout_s - (time.perf_counter() - self.t0))
        try:
            code = self.proc.wait(remaining)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace").strip().splitlines()
        self.log.close()
        payload = json.loads(self.out.read_text()) if code == 0 and self.out.exists() else None
        self._dir.cleanup()
        if code is None:
            return None, f"no answer within {self.timeout_s:.0f} s"
        if payload is None:
            last = next((line for line in reversed(tail) if line.strip()), "no output")
            return None, f"exit status {code}: {last[:200]}"
        return payload, ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
