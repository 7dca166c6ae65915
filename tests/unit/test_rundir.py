"""The run directory (vimoe_dist/train/rundir.py), without a trainer: the lock between two processes (a real kernel
lock, dropped when its holder is killed), files written whole (a real full tmpfs, which needs root as CI has), the
warning that names what changed in a resumed model, and `vimoe prune --out` refusing a training run's directory."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vimoe_dist.analysis.prune_run import check_out_dir
from vimoe_dist.config import load_config, save_config
from vimoe_dist.errors import UserError
from vimoe_dist.train.rundir import LOCK_FILE, claim_run_dir, warn_model_changes, write_run_file

REPO = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from vimoe_dist.train.rundir import claim_run_dir; claim_run_dir(sys.argv[1], 0); " \
       "print('held', flush=True); time.sleep(600)"  # fmt: skip


@contextlib.contextmanager
def holder(run_dir: Path, **env: str):
    """Another process holding the run directory's lock, as a running job's rank 0 does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **env})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _claim_elsewhere(run_dir: Path) -> subprocess.CompletedProcess:
    code = "import sys; from vimoe_dist.train.rundir import claim_run_dir; claim_run_dir(sys.argv[1], 0)"
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)  # fmt: skip


@pytest.mark.slow  # processes importing torch: tens of seconds on a loaded machine
def test_a_second_job_is_refused_naming_the_holder_until_the_holder_dies(tmp_path):
    run = tmp_path / "run"
    (run / "launch").mkdir(parents=True)
    (run / "launch" / "job.json").write_text("{}")  # `vimoe launch hostfile` writes it before any rank starts
    with holder(run, SLURM_JOB_ID="4242") as first:
        second = _claim_elsewhere(run)
        assert second.returncode == 1
        last = second.stderr.strip().splitlines()[-1]
        assert f"run.out_dir: {str(run)!r} is in use by another job (host {socket.gethostname()}, pid {first.pid}, " \
               "Slurm job 4242, since " in last, last  # fmt: skip
        first.send_signal(signal.SIGKILL)  # a job that dies leaves no stale lock
        first.wait()
        assert _claim_elsewhere(run).returncode == 0
    assert (run / LOCK_FILE).is_file() and (run / "launch" / "job.json").read_text() == "{}"


@pytest.mark.slow  # processes importing torch: tens of seconds on a loaded machine
def test_the_lock_is_not_inherited_by_forked_workers(tmp_path):
    """A forked DataLoader worker that outlives its rank (it notices the death within seconds) holds no lock."""
    code = (
        "import os, sys, time; from vimoe_dist.train.rundir import claim_run_dir; claim_run_dir(sys.argv[1], 0)\n"
        "if os.fork() == 0:\n    time.sleep(600)\nprint('forked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "forked"
        proc.kill()  # the rank dies; its forked child lives on
        proc.wait()
        assert _claim_elsewhere(tmp_path / "run").returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_claim_in_this_process_creates_the_directory(tmp_path):
    claim_run_dir(tmp_path / "new" / "run", rank=0)
    assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    claim_run_dir(tmp_path / "new" / "run", rank=0)  # the same process again: it holds it already


def test_an_unwritable_parent_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"run.out_dir: cannot write to .*file/run"):
        claim_run_dir(tmp_path / "file" / "run", rank=0)


@pytest.fixture
def full_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for mount (CI runs as root)")
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)]).returncode != 0:
        pytest.skip("mount -t tmpfs failed")
    try:
        (where / "eval.json").write_text('{"old": true}\n')
        with contextlib.suppress(OSError), open(where / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_old_file(full_tmpfs):
    with pytest.raises(UserError) as e:
        write_run_file(full_tmpfs / "eval.json", '{"top1": 0.5}\n' * 10_000)
    assert str(e.value) == f"cannot write {str(full_tmpfs / 'eval.json')!r} (No space left on device)"
    assert (full_tmpfs / "eval.json").read_text() == '{"old": true}\n'
    assert sorted(p.name for p in full_tmpfs.iterdir()) == ["eval.json", "filler"]  # no temporary file left


def test_a_resumed_model_that_changed_is_named_in_one_warning(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(load_config("configs/digits.yaml", [f"run.out_dir={run}"]), run / "config.yaml")
    changed = load_config(
        "configs/digits.yaml",
        [f"run.out_dir={run}", "model.moe.top_k=1", "model.moe.router=ec-softmax", "model.moe.capacity_factor=2.0",
         "train.steps=999", "model.pretrained=/elsewhere.safetensors"],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        changes = warn_model_changes(changed, (run / "checkpoints", "step_00000100"))
    assert changes == [
        "model.moe.capacity_factor: 1.25 -> 2.0",
        "model.moe.router: tc-softmax -> ec-softmax",
        "model.moe.top_k: 2 -> 1",
    ]  # train.* may change on a resume; model.pretrained is not read on one
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().startswith("resuming step_00000100 with a changed model (model.moe.capacity_factor")
    same = load_config("configs/digits.yaml", [f"run.out_dir={run}", "train.steps=999"])
    assert warn_model_changes(same, (run / "checkpoints", "step_00000100")) == []


def test_prune_never_writes_into_a_training_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match=r"is a training run's directory \(it holds checkpoints\)"):
        check_out_dir(run)
    (run / "checkpoints").rmdir()
    (run / "config.yaml").write_text("run: {}\n")
    with pytest.raises(UserError, match=r"\(it holds config.yaml\)"):
        check_out_dir(run)
    (run / "prune.json").write_text("{}")  # an earlier prune output may be written again
    check_out_dir(run)
    check_out_dir(tmp_path / "new")


@pytest.mark.slow  # processes importing torch: tens of seconds on a loaded machine
def test_prune_refuses_before_any_work(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("not: [a config\n")  # never read: the refusal comes first
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "prune", "--checkpoint", str(run), "--keep-layers", "1", "--out",
         str(run)], capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"vimoe prune: error: --out {run}: is a training run's directory (it holds config.yaml and checkpoints), "
        f"which prune must not overwrite; choose another directory, e.g. {run / 'pruned'}"
    ]
    assert time.monotonic() - t0 < 60
