"""The job file of a multi-node hostfile launch: each rank's `vimoe_dist` arguments and the `--env` variables, read
by every rank instead of crossing a remote shell.

DeepSpeed's multi-node runners carry arguments and variables on a command line: pdsh through each node's shell,
where an override such as `data.train=/d/train-{0..9}.tar` or a value with `$(...)` is expanded or run
(`vimoe_dist.launch.pdsh`), and mpirun/srun as `-x NAME=VALUE` that any user of the node can read in `ps`. So
`vimoe launch hostfile` writes `RUN/launch/job.json` (mode 0600 in a 0700 directory) and starts

    python -m vimoe_dist.launch.jobspec /abs/RUN/launch/job.json

on every node; that reads the file, refuses one that others could read, and replaces itself with
`python -m vimoe_dist ARGS...` under the file's variables (exec, so the launcher's pid and signals reach the
rank). The run directory is on storage every node sees, as expert-parallel checkpoints already require.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from vimoe_dist.atomic import write_atomic
from vimoe_dist.errors import UserError

MODULE = "vimoe_dist.launch.jobspec"
FILE_NAME = "job.json"


def job_file(run_dir: str | os.PathLike) -> Path:
    return (Path(run_dir) / "launch" / FILE_NAME).resolve()


def write_job_file(path: Path, argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Writes the file readable by its owner only, replacing any earlier one atomically.

    Raises:
        UserError: the directory cannot be made or written.
    """
    payload = json.dumps({"argv": list(argv), "env": dict(env)}, indent=1) + "\n"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, payload, mode=0o600)
    except OSError as e:
        raise UserError(f"cannot write the job file {path}: {e.strerror}") from None


def read_job_file(path: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a job file that only its owner can read.

    Raises:
        UserError: a missing file (the run directory is not shared with this node), one owned by someone else or
            readable by group or others, or one that is not a job file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise UserError(
            f"job file {path}: {e.strerror} on {os.uname().nodename} (run.out_dir must be on storage every node sees)"
        ) from None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise UserError(f"job file {path}: not a regular file of this user with mode 0600; refusing it")
        try:
            data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"job file {path}: not a job file ({e})") from None
    data = data if isinstance(data, dict) else {}
    argv, env = data.get("argv"), data.get("env")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise UserError(f"job file {path}: 'argv' is not a list of strings")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise UserError(f"job file {path}: 'env' is not a map of strings")
    return argv, env


def rank_exec_argv(argv: Sequence[str], orig_argv: Sequence[str], executable: str) -> list[str]:
    """`python [its flags] -m vimoe_dist ARGS`: the interpreter flags this process was started with (DeepSpeed
    starts ranks with `-u`) are kept."""
    flags: list[str] = []
    for arg in orig_argv[1:]:
        if arg == "-m":
            break
        flags.append(arg)
    return [executable, *flags, "-m", "vimoe_dist", *argv]


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    if len(args) != 1:
        print(f"usage: python -m {MODULE} JOB_FILE", file=sys.stderr)
        return 2
    try:
        argv, env = read_job_file(Path(args[0]))
    except UserError as e:
        sys.stderr.write(f"vimoe launch: error: {e}\n")
        return 2
    os.execve(sys.executable, rank_exec_argv(argv, sys.orig_argv, sys.executable), {**os.environ, **env})
    return 0  # unreachable


if __name__ == "__main__":
    sys.exit(main())
