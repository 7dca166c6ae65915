"""Talking to Slurm from a login node: submitting a batch script and reading back its job id (the one way every
`vimoe` command submits: `launch slurm --submit`, `study ... --slurm`), and asking `sinfo` how many cores a node has.

`sbatch --parsable` prints `JOBID` or `JOBID;CLUSTER` (`man sbatch`); with `--wait` it returns when the job ends,
with the job's exit code. Every call is bounded: sbatch without `--wait` and sinfo get a timeout (a controller that
does not answer is one line, not a hang); `--wait` is bounded by the job's own time limit, and Ctrl-C stops the
waiting, not the job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vimoe_dist.errors import UserError

SBATCH_TIMEOUT_S = 300.0  # sbatch retries a busy controller by itself for a while
SINFO_TIMEOUT_S = 15.0


@dataclass
class Submitted:
    job_id: int | None  # None: sbatch failed before printing one
    returncode: int  # sbatch's; with --wait, the job's
    script: Path


def sbatch_command(script: Path, *, wait: bool = False) -> list[str]:
    return ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]


def parse_job_id(stdout: str) -> int:
    """The job id in the output of `sbatch --parsable` (`1234` or `1234;cluster`).

    Raises:
        UserError: output without a job id.
    """
    first = next((line for line in stdout.splitlines() if line.strip()), "")
    job_id = first.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return int(job_id)


def submit(script: str, path: Path, *, wait: bool = False, make_dirs: Sequence[Path] = ()) -> Submitted:
    """Writes `script` to `path` (mode 0600: it may hold `--env` values), creates `make_dirs` (sbatch cannot create
    its `--output` directory), prints the sbatch command line and runs it.

    Raises:
        UserError: the script cannot be written, sbatch is not installed or does not answer in time, or it exited
            0 without a job id.
    """
    cmd = sbatch_command(path, wait=wait)
    try:
        for directory in (path.parent, *make_dirs):
            directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(script)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    print(shlex.join(cmd), flush=True)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: submit from a Slurm login node, or print the script instead") from None
    if wait:
        out = _wait_for_job(proc)
    else:
        try:
            out, _ = proc.communicate(timeout=SBATCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise UserError(f"sbatch did not answer within {SBATCH_TIMEOUT_S:.0f} s (is slurmctld up?)") from None
    job_id = _maybe_job_id(out)
    if proc.returncode == 0 and job_id is None:
        parse_job_id(out)  # raises with what sbatch printed
    return Submitted(job_id, proc.returncode, path)


def _wait_for_job(proc: subprocess.Popen) -> str:
    """`sbatch --parsable --wait`: the job id comes at submission, the exit at the job's end. Ctrl-C stops the
    waiting (sbatch is ended), not the job, and says so in one line."""
    out = ""
    try:
        out = proc.stdout.readline()
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        job = _maybe_job_id(out)
        where = f"job {job} keeps running (scancel {job} stops it)" if job else "the job, if submitted, keeps running"
        sys.stderr.write(f"vimoe: stopped waiting for sbatch: {where}\n")
        raise SystemExit(130) from None
    finally:
        proc.stdout.close()
    return out


def _maybe_job_id(out: str | None) -> int | None:
    try:
        return parse_job_id(out or "")
    except UserError:
        return None


def max_node_cpus(partition: str | None = None) -> int | None:
    """The most CPUs any node of `partition` (default: the default partition) has, from `sinfo`; None when that
    cannot be known here (no sinfo, no answer, no such partition)."""
    cmd = ["sinfo", "--noheader", "--Node", "--format=%P %c"]
    if partition:
        cmd.append(f"--partition={partition}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    cpus = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        part, count = fields
        if partition is None and not part.endswith("*"):  # sinfo marks the default partition with '*'
            continue
        if count.rstrip("+").isdigit():
            cpus.append(int(count.rstrip("+")))
    return max(cpus) if cpus else None
