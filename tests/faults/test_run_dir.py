"""A run directory holds one job and its own run only, stop signals are heard at any point, and a run with a bad
cause gets the right blame and the right result; real training runs (torchrun, gloo on CPU, or one process):

- a second job on a running job's directory exits 2 on every rank within seconds, naming the first (host, pid), and
  the first job is not disturbed;
- a `latest` naming another run's tag and a tag directory that is a symbolic link into another run are neither
  resumed nor written through: the run resumes its own newest tag, and the other run's files stay as they were;
- `run.resume=never` over complete checkpoints and a resume refused for another model change nothing in the run
  (its `config.yaml` included); a resume with another top_k and capacity goes on with one warning naming both;
- SIGTERM and SIGINT to a rank stuck in the rendezvous (nothing to save) end it at once with 143 and 130;
- Ctrl-C in training checkpoints the current step and exits 130; the same command resumes from it;
- NaN patch-embedding weights: every step is blamed on the embedding, not the first router, and the run exits 2
  with nothing saved;
- an `eval.json` that cannot be written is one line, after the final checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from conftest import TINY, assert_no_rank_traceback
from safetensors.torch import save_file

from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ONE = ("parallel.ep_size=1",)  # the overrides of a one-process run


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "vimoe train: error:" in line]


def _files(root, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, bytes]]:
    """Every file under `root` (but `skip`) with its modification time and content."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in root.rglob("*")
        if p.is_file() and str(p.relative_to(root)) not in skip
    }


def test_a_second_job_exits_2_on_every_rank_naming_the_first(jobs, tmp_path):
    out = tmp_path / "run"
    first = jobs.start(out, *ONE, "train.steps=100000", "train.checkpoint_every=0", nproc=1)
    first.wait_for_step(2)
    t0 = time.monotonic()
    second = jobs.start(out)  # two ranks under torchrun
    assert second.finish(timeout=300) == 1  # torchrun's code for failed workers; the ranks exit 2
    errors = _errors(second.log)
    holder = f"is in use by another job (host {socket.gethostname()}, pid {first.proc.pid}, since "
    assert len(errors) == 2 and all(f"run.out_dir: {str(out)!r} {holder}" in e for e in errors), second.log[-3000:]
    assert_no_rank_traceback(second.log)
    assert time.monotonic() - t0 < 240

    assert first.proc.poll() is None  # undisturbed: it stops when asked, with a checkpoint
    steps_before = len(first.steps())
    first.wait_for_step(max(first.steps()) + 2)
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.finish() == 75, first.log[-3000:]
    assert len(first.steps()) > steps_before and latest_tag(out / "checkpoints") is not None


def test_another_runs_latest_and_symlinked_tags_are_neither_resumed_nor_written(jobs, tmp_path):
    other, own = tmp_path / "other", tmp_path / "own"
    jobs.run(other, *ONE, "train.steps=8", nproc=1)
    jobs.run(own, *ONE, "train.steps=8", "train.stop_at=4", nproc=1)
    (own / "checkpoints" / "latest").write_text(str(other / "checkpoints" / "step_00000008"))
    (own / "checkpoints" / "step_00000008").symlink_to(other / "checkpoints" / "step_00000004")
    before = _files(other)

    job = jobs.run(own, *ONE, "train.steps=8", nproc=1)
    assert f"resumed from {own / 'checkpoints' / 'step_00000004'} at step 4" in job.log, job.log[-3000:]
    warning = f"{own / 'checkpoints' / 'latest'} names {str(other / 'checkpoints' / 'step_00000008')!r}, which is "
    assert warning in job.log, job.log[-3000:]
    assert _files(other) == before  # neither read as this run's nor written through
    tag = own / "checkpoints" / "step_00000008"
    assert tag.is_dir() and not tag.is_symlink() and (tag / "COMPLETE").is_file()
    assert (own / "checkpoints" / "latest").read_text() == "step_00000008"


def test_refused_starts_change_nothing_and_a_changed_router_setting_is_named(jobs, tmp_path):
    out = tmp_path / "run"
    jobs.run(out, *ONE, "train.steps=4", nproc=1)
    before = _files(out, skip=("metrics.jsonl", ".lock"))  # reopened and retaken by every start

    job = jobs.run(out, *ONE, "train.steps=4", "run.resume=never", nproc=1, expect=2)
    (error,) = _errors(job.log)
    assert f"run.resume=never: {str(out)!r} already holds a run (latest checkpoint step_00000004)" in error, error
    assert "choose a new run.out_dir" in error

    job = jobs.run(out, *ONE, "train.steps=6", "model.moe.num_experts=8", nproc=1, expect=2)
    (error,) = _errors(job.log)
    assert "does not fit this run (model.moe.num_experts)" in error and "of 8 experts" in error, error
    # config.yaml included: eval and analysis of the run still read the right model
    assert _files(out, skip=("metrics.jsonl", ".lock")) == before

    job = jobs.run(out, *ONE, "train.steps=6", "model.moe.top_k=1", "model.moe.capacity_factor=2.0", nproc=1)
    warnings = [line for line in job.log.splitlines() if "with a changed model" in line]
    assert len(warnings) == 1 and (
        "resuming step_00000004 with a changed model (model.moe.capacity_factor: 1.25 -> 2.0, "
        "model.moe.top_k: 2 -> 1)" in warnings[0]
    ), job.log[-3000:]
    assert "top_k: 1" in (out / "config.yaml").read_text()


def _listening(port: int) -> bool:
    """A socket listens on `port` (Linux /proc/net/tcp*; the lone rank's rendezvous store)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT and SIGUSR1 before a step: tests/unit/test_stop_signals.py
def test_a_stop_signal_before_the_first_step_ends_a_stuck_rank_at_once(jobs, tmp_path, sig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    job = jobs.start(tmp_path / "run", "parallel.timeout_s=600", nproc=1, env=env)  # rank 1 never comes
    try:
        deadline = time.monotonic() + 300
        while not _listening(port):
            assert job.proc.poll() is None and time.monotonic() < deadline, job.log[-3000:]
            time.sleep(0.2)
        time.sleep(1)
        t0 = time.monotonic()
        os.kill(job.proc.pid, sig)
        assert job.proc.wait(timeout=30) == 128 + sig
        assert time.monotonic() - t0 < 30
    finally:
        job.kill()
    name = signal.Signals(sig).name
    assert f"rank 0: {name} before the first finite step: nothing to save; exit code {128 + sig}" in job.log
    assert "Traceback" not in job.log


@pytest.mark.parametrize("rank", [1])  # rank 0 waiting for a peer that never comes ends the same way
def test_a_rendezvous_that_cannot_complete_is_one_line_within_the_timeout(jobs, tmp_path, rank):
    """Rank 1 with no master listening (an unreachable master) ends within parallel.timeout_s with one line naming
    the master, exit 2, no traceback and nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    out = tmp_path / "run"
    job = jobs.start(out, "parallel.timeout_s=4", nproc=1, env=env)
    assert job.finish(timeout=240) == 2, job.log[-3000:]
    errors = _errors(job.log)
    assert len(errors) == 1 and f"could not join the job at the master 127.0.0.1:{port}" in errors[0], job.log[-3000:]
    assert "parallel.timeout_s=4 s" in errors[0]
    assert "Traceback" not in job.log
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_ctrl_c_in_training_checkpoints_exits_130_and_the_command_resumes(jobs, tmp_path):
    out = tmp_path / "run"
    job = jobs.start(out, *ONE, "train.steps=100000", "train.checkpoint_every=0", nproc=1)
    job.wait_for_step(3)
    os.kill(job.proc.pid, signal.SIGINT)
    assert job.finish() == 130, job.log[-3000:]
    tag = latest_tag(out / "checkpoints")
    assert tag is not None, job.log[-3000:]
    step = int(tag.removeprefix("step_"))
    assert step >= 3 and f"SIGINT received, checkpointing at step {step} and exiting" in job.log
    assert f"checkpoint of step {step} done" in job.log and "Traceback" not in job.log

    job = jobs.run(out, *ONE, f"train.steps={step + 2}", nproc=1)
    assert f"resumed from {out / 'checkpoints' / tag} at step {step}" in job.log


def test_nan_embedding_is_blamed_and_a_run_without_a_finite_step_saves_nothing(jobs, tmp_path):
    from vimoe_dist.config import load_config
    from vimoe_dist.model import build_model

    cfg = load_config("configs/digits.yaml", [o for o in TINY if not o.startswith("data.")])
    state = {k: v.contiguous() for k, v in build_model(cfg.model).state_dict().items()}
    state["patch_embed.proj.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.safetensors"
    save_file(state, str(weights))

    out = tmp_path / "run"
    job = jobs.run(out, f"model.pretrained={weights}", "train.steps=4", expect=1)
    cause = "the patch embedding has non-finite weights (patch_embed.proj.weight) on rank 0"
    for rank in (0, 1):
        assert f"rank{rank}] WARNING step 1: non-finite loss, update skipped ({cause})" in job.log, job.log[-3000:]
    assert "router" not in job.log.split("update skipped")[1].splitlines()[0]
    errors = _errors(job.log)
    assert len(errors) == 2 and all(
        f"no finite step: the loss was not finite in any step of this job up to step 4 ({cause}); nothing saved, "
        "no checkpoint stays the latest" in e
        for e in errors
    ), errors
    assert latest_tag(out / "checkpoints") is None and not (out / "eval.json").exists()
    assert_no_rank_traceback(job.log)


def test_an_eval_json_that_cannot_be_written_is_one_line_after_the_checkpoint(jobs, tmp_path):
    out = tmp_path / "run"
    (out / "eval.json").mkdir(parents=True)  # stands in for any write error: a full disk, a quota, a read-only file
    job = jobs.run(out, *ONE, "train.steps=2", nproc=1, expect=2)
    assert _errors(job.log) == [f"vimoe train: error: cannot write {str(out / 'eval.json')!r} (Is a directory)"]
    assert "Traceback" not in job.log
    assert latest_tag(out / "checkpoints") == "step_00000002"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
