"""Fixtures for the system tests: a real Slurm cluster on this machine (launcher/dev/slurm-cluster.sh: slurmctld and
two slurmd, each in its own network namespace, MUNGE auth) and helpers to submit and watch jobs.

The cluster needs root (network namespaces, daemons); CI runs as root. The session starts it (installing the
Debian packages when missing) and tears it down at the end, killing every process left in its namespaces, unless
it was already up before the session (a developer's running cluster is left as found).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "launcher" / "dev" / "slurm-cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmCluster:
    """Client side of the test cluster: every command runs in the controller's namespace with its SLURM_CONF."""

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(CLUSTER_SCRIPT), "run", *cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def submit(self, script: Path) -> int:
        return int(self.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, states: set[str] = FINAL_STATES) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                self.cancel(job_id)
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout} s: {info}")
            time.sleep(1)

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)

    @staticmethod
    def wait_for(predicate, timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout} s")
            time.sleep(0.5)

    @staticmethod
    def logs(log_dir: Path) -> str:
        """All Slurm output files of a job's log directory, for assertion messages."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(Path(log_dir).glob("*.out")))

    def signal(self, job_id: int, sig: str) -> None:
        """Sends `sig` to every task of the job's steps, what `--signal` does at the time limit."""
        self.run("scancel", f"--signal={sig}", str(job_id))


def _cluster_up() -> bool:
    result = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.count("idle") >= 2


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (network namespaces and daemons); CI runs as root")
    if not (shutil.which("ip") and shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("the Slurm test cluster needs iproute2 (ip netns) and util-linux (unshare, nsenter)")
    was_up = _cluster_up()
    subprocess.run([str(CLUSTER_SCRIPT), "up"], check=True, timeout=900)
    try:
        yield SlurmCluster()
    finally:
        if not was_up:
            subprocess.run([str(CLUSTER_SCRIPT), "down"], check=False, timeout=120)


class DigitsRuns:
    """Tiny training runs of configs/digits.yaml for the launcher tests: the point is the launch, not the accuracy."""

    config = REPO / "configs" / "digits.yaml"

    def __init__(self, data: Path) -> None:
        self.data = data

    def overrides(self, out_dir: Path, steps: int, checkpoint_every: int) -> list[str]:
        num_train = len(list(self.data.glob("train-*.tar")))
        return [
            f"run.out_dir={out_dir}",
            f"train.steps={steps}",
            "train.global_batch_size=16",
            "train.log_every=1",
            f"train.checkpoint_every={checkpoint_every}",
            "train.warmup_steps=2",
            "train.progress=false",
            "data.num_workers=0",
            f"data.train={self.data}/train-{{000000..{num_train - 1:06d}}}.tar",
            f"data.val={self.data}/val-000000.tar",
        ]

    @staticmethod
    def steps(out_dir: Path) -> list[int]:
        """The `step` of every training record of metrics.jsonl, in file order (across restarts)."""
        path = Path(out_dir) / "metrics.jsonl"
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r["step"] for r in records if "loss" in r]

    @staticmethod
    def resumed_at(log: str) -> list[int]:
        """The steps the trainer says it resumed from ("resumed from DIR at step N"), in order. (metrics.jsonl
        cannot tell: a resumed run drops the records after its checkpoint step.)"""
        return [int(n) for n in re.findall(r"resumed from \S+ at step (\d+)", log)]

    @staticmethod
    def eval_result(out_dir: Path) -> dict:
        return json.loads((Path(out_dir) / "eval.json").read_text())


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> DigitsRuns:
    """The demo's digits shards (`vimoe data digits`), written once per session."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "data", "digits", "--out", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return DigitsRuns(out)
