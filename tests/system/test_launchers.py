"""`vimoe launch local` with the real launchers: the deepspeed launcher and torchrun each train the digits config on
2 CPU ranks, and torchrun's elastic agent (`--max-restarts 1`) restarts the job after `kill -9` of one rank, which
then resumes from its last checkpoint and finishes. `vimoe launch hostfile --no-ssh` runs the deepspeed launcher on
the two nodes of the test Slurm cluster's network namespaces (conftest.py), one node rank each.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vimoe_dist.launch.supervise import descendants

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "launcher" / "dev" / "slurm-cluster.sh"


class Started:
    """A command started in its own session with its output in a log file; a failed test ends the whole process
    tree (`vimoe launch`, the launcher in its own session, agent, ranks)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        return code, self.log.read_text(errors="replace")


def launch(digits, out: Path, launcher: str, steps: int, checkpoint_every: int, *extra: str) -> Started:
    argv = [
        sys.executable, "-m", "vimoe_dist", "launch", "local", "--nproc", "2", "--launcher", launcher, *extra,
        "--config", str(digits.config), *digits.overrides(out, steps, checkpoint_every),
    ]  # fmt: skip
    return Started(argv, out.parent / f"{launcher}.log")


@pytest.mark.parametrize(  # torchrun trains in test_torchrun_restarts_after_kill_9_and_resumes
    ("launcher", "module"), [("deepspeed", "deepspeed.launcher.runner")]
)
def test_local_launcher_trains_digits(digits, tmp_path, launcher, module):
    out = tmp_path / "run"
    code, log = launch(digits, out, launcher, steps=6, checkpoint_every=0).finish()
    assert code == 0, log
    # the exact command line comes first on stdout, after what was checked (and any data warning) on stderr
    printed = shlex.split(next(line for line in log.splitlines() if line.startswith(sys.executable)))
    assert printed[:3] == [sys.executable, "-m", module] and "vimoe_dist" in printed, log
    assert digits.steps(out)[-1] == 6 and digits.eval_result(out)["images"] > 0, log


def rank_pid(launch: int, rank: int) -> int | None:
    """The pid of worker `rank` among the descendants of `vimoe launch` (read from /proc, Linux)."""
    for pid in descendants(launch):
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return pid
    return None


def test_torchrun_restarts_after_kill_9_and_resumes(digits, tmp_path):
    every, steps = 4, 24
    out = tmp_path / "run"
    run = launch(digits, out, "torchrun", steps, every, "--max-restarts", "1")
    try:
        deadline = time.monotonic() + 600
        while not any(s > every + 1 for s in digits.steps(out)):  # past the first periodic checkpoint
            assert run.proc.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.5)
        victim = rank_pid(run.proc.pid, rank=1)  # `vimoe launch` -> torchrun agent -> workers
        assert victim is not None, "no worker with RANK=1 under the torchrun agent"
        os.kill(victim, signal.SIGKILL)
        killed_at = max(digits.steps(out))
        assert killed_at < steps, "the run ended before the kill; make it longer"
    except BaseException:
        run.kill()
        raise
    code, log = run.finish()
    assert code == 0, log
    assert digits.steps(out)[-1] == steps and digits.eval_result(out)["images"] > 0, log
    # the restarted ranks went back to the last checkpoint, not to step 0: at most `every` steps were done twice
    resumed = digits.resumed_at(log)
    assert len(resumed) == 1 and 0 < resumed[0] <= killed_at <= resumed[0] + every, (killed_at, resumed, log[-3000:])


@pytest.mark.system
def test_hostfile_no_ssh_across_two_nodes(slurm_cluster, digits, tmp_path):
    """Each "node" (a network namespace of the test cluster with its own hostname and address) runs the same
    `vimoe launch hostfile --no-ssh` with its node rank, as on a cluster whose scheduler starts one agent per node;
    the two ranks (ep_size 2) talk over the link between the namespaces."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("vn1 slots=1\nvn2 slots=1\n")
    out = tmp_path / "run"
    runs = []
    for node_rank, node in enumerate(("vn1", "vn2")):
        argv = [
            str(CLUSTER_SCRIPT), "on", node, sys.executable, "-m", "vimoe_dist", "launch", "hostfile",
            "--hostfile", str(hostfile), "--no-ssh", f"--node-rank={node_rank}", "--master-addr=vn1",
            "--master-port=29531", "--env", "VIMOE_NODE_CHECK=1", "--config", str(digits.config),
            *digits.overrides(out, 6, 0),
        ]  # fmt: skip
        runs.append(Started(argv, tmp_path / f"{node}.log"))
    try:
        results = [run.finish() for run in runs]
    finally:
        for run in runs:
            run.kill()
    log = "\n".join(text for _, text in results)
    assert [code for code, _ in results] == [0, 0], log
    printed = next(line for line in results[1][1].splitlines() if "deepspeed.launcher.runner" in line)
    assert "--no_ssh --node_rank=1" in printed, log
    assert "(values not shown): VIMOE_NODE_CHECK" in results[1][1] and "VIMOE_NODE_CHECK=1" not in log, log
    assert "nnodes=2, num_local_procs=1, node_rank=1" in results[1][1], log
    assert digits.steps(out)[-1] == 6 and digits.eval_result(out)["images"] > 0, log
