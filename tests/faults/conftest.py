"""Fixtures of the fault-injection suite: the digits shards, tiny 2-rank training runs under torchrun (gloo on CPU)
whose processes the tests signal, stop and kill, and the weights of a run that never failed, to compare against.

Every run of the suite uses the same tiny model and `data.order=exact`, so a run that is interrupted after a
checkpoint and resumed must end with the reference run's weights bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import TINY_RUN, children

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
EVERY = 4
SECRET = "vimoe-test-secret-4f1c9a7e0b2d"  # set as AWS_SECRET_ACCESS_KEY in every run; must appear in no file

TINY = [
    *TINY_RUN,
    "train.progress=false",
    f"train.steps={STEPS}",
    f"train.checkpoint_every={EVERY}",
    "train.keep_checkpoints=10",
    "parallel.ep_size=2",
]


class Run:
    """One started job (torchrun or a plain process) in its own session, output in a log file."""

    def __init__(self, argv: list[str], out: Path, log: Path, env: dict[str, str]) -> None:
        self.out, self.log_path = out, log
        self.started = time.monotonic()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def steps(self) -> list[int]:
        """Logged training steps so far (metrics.jsonl; a torn last line is skipped)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec and "event" not in rec:
                out.append(rec["step"])
        return out

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(s >= step for s in self.steps()):
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (code {self.proc.returncode}) before step {step}:\n{self.log}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"step {step} not reached in {timeout} s:\n{self.log[-3000:]}")
            time.sleep(0.2)

    def rank_pid(self, rank: int) -> int:
        """The pid of the worker with RANK=`rank`: a child of torchrun's agent (our process), leading its own
        session and process group (torchrun starts workers with start_new_session; read from Linux /proc)."""
        for pid in children(self.proc.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker with RANK={rank} under {self.proc.pid}:\n{self.log[-2000:]}")

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Ends the agent and every worker's process group (DataLoader workers included); a stopped worker gets
        SIGCONT so that it can die."""
        for pid in children(self.proc.pid):
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Jobs:
    """Starts training jobs on the digits shards with the suite's tiny config."""

    def __init__(self, data: Path, tmp: Path) -> None:
        self.data, self.tmp = data, tmp
        self.count = 0

    def start(
        self,
        out: Path,
        *overrides: str,
        nproc: int = 2,
        faults: str = "",
        max_restarts: int = 0,
        env: dict[str, str] | None = None,
    ) -> Run:
        args = [
            "-m", "vimoe_dist", "train", "--config", "configs/digits.yaml",
            f"data.train={self.data}/train-{{000000..000011}}.tar", f"data.val={self.data}/val-000000.tar",
            *TINY, f"run.out_dir={out}", *overrides,
        ]  # fmt: skip
        if nproc == 1:
            argv = [sys.executable, *args]
        else:
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    f"--max-restarts={max_restarts}", *args]  # fmt: skip
        run_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            # a fresh rendezvous store per restart round (rank 0's), as the launcher tests do
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            # DeepSpeed's JIT-built CPU op in a cache of this interpreter's own: another checkout's .venv sharing
            # ~/.cache/torch_extensions rebuilds it back and forth, and a rank waiting on that build misses the
            # rendezvous
            "TORCH_EXTENSIONS_DIR": extensions_dir(),
            **(env or {}),
        }
        run_env.pop("VIMOE_TEST_FAULTS", None)
        if faults:
            run_env["VIMOE_TEST_FAULTS"] = faults
        self.count += 1
        return Run(argv, out, self.tmp / f"{out.name}-{self.count}.log", run_env)

    def run(self, out: Path, *overrides: str, expect: int = 0, **kw) -> Run:
        job = self.start(out, *overrides, **kw)
        code = job.finish()
        assert code == expect, f"exit {code}, expected {expect}:\n{job.log[-4000:]}"
        return job


def assert_no_rank_traceback(log: str) -> None:
    """No traceback through our code or DeepSpeed's (torchrun's agent prints its own when a worker fails)."""
    frames = re.findall(r'File "[^"]*/(?:vimoe_dist|deepspeed)/[^"]*"', log)
    assert not frames, log[-4000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
    from vimoe_dist.train.checkpoint import latest_tag

    root = out / "checkpoints"
    return single_device_state_dict(root, latest_tag(root))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from vimoe_dist.data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def jobs(digits_dir, tmp_path_factory) -> Jobs:
    if not torch.cuda.is_available():
        # DeepSpeed JIT-builds its CPU communication op on first use (about a minute on a busy machine): build it
        # once here, so that no rank of the first job waits on the build past the rendezvous timeout
        code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=900,
                       env={**os.environ, "TORCH_EXTENSIONS_DIR": extensions_dir()})  # fmt: skip
    return Jobs(digits_dir, tmp_path_factory.mktemp("fault-logs"))


@pytest.fixture(scope="session")
def reference(jobs, tmp_path_factory) -> Path:
    """A run of STEPS steps that never failed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    job = jobs.run(out)
    assert job.steps()[-1] == STEPS
    return out
