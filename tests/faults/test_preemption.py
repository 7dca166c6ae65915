"""Preemption: SIGTERM (torchrun forwards its own to every worker's process group, DataLoader workers included) and
SIGUSR1 (Slurm's `--signal=USR1@grace`, here sent to one rank's process group only) each end the job with a
checkpoint of the current step within the grace time and exit code 75; rerunning the command resumes, and the run
ends with the weights of a run that was never interrupted, bit for bit."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from conftest import STEPS, assert_same_weights, final_weights

from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TORCHRUN_GRACE_S = 30  # torchrun sends SIGKILL this long after its SIGTERM


def _saved_step(out) -> int:
    tag = latest_tag(out / "checkpoints")
    assert tag is not None
    return int(tag.removeprefix("step_"))


def test_sigterm_then_sigusr1_checkpoint_exit_75_and_resume_exactly(jobs, reference, tmp_path):
    out = tmp_path / "run"
    workers = "data.num_workers=1"  # the signal reaches the DataLoader workers too

    # SIGTERM to torchrun's agent, which sends SIGTERM to each worker's whole process group
    job = jobs.start(out, workers)
    job.wait_for_step(2)
    t0 = time.monotonic()
    os.kill(job.proc.pid, signal.SIGTERM)
    job.finish()
    assert time.monotonic() - t0 < TORCHRUN_GRACE_S, job.log[-3000:]
    log = job.log
    assert "SIGTERM received, checkpointing at step" in log, log[-3000:]
    assert len(re.findall(r"exit code 75", log)) == 2, log[-3000:]  # both ranks checkpointed and left with 75
    assert "DataLoader worker" not in log, log[-3000:]
    first = _saved_step(out)
    assert 2 <= first < STEPS

    # SIGUSR1 to rank 1's process group only: the ranks agree on it, both checkpoint and exit 75
    job = jobs.start(out, workers)
    job.wait_for_step(first + 1)
    os.killpg(job.rank_pid(1), signal.SIGUSR1)
    job.finish()
    log = job.log
    assert f"resumed from {out / 'checkpoints' / f'step_{first:08d}'} at step {first}" in log, log[-3000:]
    assert "rank 1: SIGUSR1 received" in log and "rank 0: stop request from another rank" in log, log[-3000:]
    assert re.search(r"exitcode\s*:\s*75", log), log[-3000:]  # torchrun's report of the workers' exit code
    second = _saved_step(out)
    assert first < second < STEPS

    # the same command again finishes the run: the weights are those of the uninterrupted run
    jobs.run(out, workers)
    assert_same_weights(final_weights(reference), final_weights(out))


def test_sigterm_during_an_evaluation_checkpoints_at_once_and_resumes_exactly(jobs, reference, tmp_path):
    """The ranks agree before every evaluation batch whether one of them was asked to stop, and leave the evaluation
    together to checkpoint: a long evaluation must not eat the grace time the checkpoint needs."""
    out = tmp_path / "run"
    job = jobs.start(out, "train.eval_every=6", faults="term_in_eval@6:rank=1")
    job.finish()
    log = job.log
    assert "rank 1: SIGTERM received during the evaluation, checkpointing at step 6" in log, log[-3000:]
    assert "rank 0: stop request from another rank received during the evaluation" in log, log[-3000:]
    assert len(re.findall(r"exit code 75", log)) == 2, log[-3000:]
    assert _saved_step(out) == 6
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_top1" in line]
    assert records == [], records  # the interrupted evaluation reports nothing

    # rerun: resumes at step 6, evaluates on schedule at step 12, finishes with the uninterrupted run's weights
    job = jobs.run(out, "train.eval_every=6")
    assert f"resumed from {out / 'checkpoints' / 'step_00000006'} at step 6" in job.log, job.log[-3000:]
    assert_same_weights(final_weights(reference), final_weights(out))
