"""A rank that hangs (SIGSTOP: it keeps its sockets open and never answers) in the middle of training: the other
rank gives up within `parallel.timeout_s` (the expert-parallel all-to-all included, whose process group DeepSpeed
creates without a timeout of its own), says which rank did not answer and exits non-zero; torchrun's
`--max-restarts` then starts the job again, which resumes from the last checkpoint and ends with the weights of a
run that never failed."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime

import pytest
from conftest import assert_same_weights, final_weights

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TIMEOUT_S = 10


def _stamp(log: str, pattern: str) -> datetime:
    m = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) rank\d\][^\n]*" + pattern, log)
    assert m, f"{pattern!r} not in the log:\n{log[-3000:]}"
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_sigstopped_rank_is_named_within_the_timeout_and_restart_resumes(jobs, reference, tmp_path):
    out = tmp_path / "run"
    job = jobs.start(out, f"parallel.timeout_s={TIMEOUT_S}", faults="stop@6:rank=1", max_restarts=1)
    try:
        deadline = time.monotonic() + 300
        while "rank 0: a collective failed or timed out" not in job.log:
            assert job.proc.poll() is None and time.monotonic() < deadline, job.log[-3000:]
            time.sleep(0.5)
        # torchrun now stops the old round; a stopped process acts on its SIGTERM only once continued (else torchrun
        # waits 30 s before SIGKILL): wake the hung rank, as a node coming back would
        stopped = job.rank_pid(1)
        os.killpg(stopped, signal.SIGCONT)
    except BaseException:
        job.kill()
        raise
    code = job.finish()
    log = job.log
    assert code == 0, log[-4000:]

    hung = _stamp(log, "test hook: stop at step 6")
    noticed = _stamp(log, "rank 0: a collective failed or timed out")
    assert (noticed - hung).total_seconds() < TIMEOUT_S + 15, (hung, noticed)  # + the check-in wait, + load
    assert "rank 1 did not answer (dead or hung)" in log, log[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in log, log[-3000:]
    assert_same_weights(final_weights(reference), final_weights(out))
