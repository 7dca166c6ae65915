"""Slurm batch scripts rendered from `launcher/slurm/vimoe.sbatch.tmpl`.

The template holds the job's logic (rendezvous, srun, requeue on exit 75); this module fills in the `#SBATCH`
directives, the environment and the rank command. One task per GPU (`--ntasks-per-node` defaults to the GPUs per
node; on CPU-only clusters it alone sets the ranks), `srun` starts the ranks, each rank resolves its place from the
`SLURM_*` variables (`vimoe_dist.parallel.env`).

Preemption: `--signal=USR1@grace` asks Slurm to signal every task of the job's steps `grace` seconds before the
time limit. Without `B:`, so the ranks get the signal themselves: with `B:` only the batch shell would, and bash
runs a trap only after the foreground `srun` returns, so the script would have to background srun, wait, and
forward the signal with `scancel --signal`, one more hop that can lose the race against the limit. The ranks
checkpoint together and exit 75 (EX_TEMPFAIL); the script then runs `scontrol requeue`, and the requeued job resumes
from that checkpoint. Slurm may signal up to 60 s early (`man sbatch`), so the grace must cover 60 s plus a step
plus a checkpoint.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vimoe_dist.errors import UserError
from vimoe_dist.launch.rendezvous import SLURM_PORT_BASE, SLURM_PORT_SPAN

TEMPLATE_NAME = "vimoe.sbatch.tmpl"
EX_TEMPFAIL = 75  # the trainer's "checkpointed after a signal, requeue me" exit code

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Slurm --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (man sbatch)
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmJob:
    """What `vimoe launch slurm` asks of Slurm; see `vimoe launch slurm --help` for each field."""

    command: list[str]  # one rank's argv, e.g. cmdline.train_argv(...)
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # None: gpus_per_node, or 1 on a CPU-only job
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    mem: str | None = None
    job_name: str = "vimoe"
    log_dir: str = "logs"
    workdir: str = "."
    signal_grace: int = 120
    requeue: bool = True
    extra_sbatch: list[str] = field(default_factory=list)  # "key=value" or "flag" -> "#SBATCH --key=value"
    env: list[str] = field(default_factory=list)  # "NAME=VALUE" exported before srun
    srun_args: list[str] = field(default_factory=list)  # e.g. pyxis' --container-image=...

    @property
    def num_tasks_per_node(self) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


def default_template() -> Path:
    """`launcher/slurm/vimoe.sbatch.tmpl` of the source tree this package runs from (editable installs, the Docker
    image), else of the current directory.

    Raises:
        UserError: when neither exists; `--template` names one explicitly.
    """
    candidates = [
        Path(__file__).resolve().parents[2] / "launcher" / "slurm" / TEMPLATE_NAME,
        Path.cwd() / "launcher" / "slurm" / TEMPLATE_NAME,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"no sbatch template at {candidates[0]} or {candidates[1]}; pass --template FILE")


def render_sbatch(job: SlurmJob, template: str) -> str:
    """Fills `template` for `job`.

    Raises:
        UserError: an impossible request (no nodes or tasks, a bad `--time`, a grace longer than the time limit, a
            bad environment entry) or a template placeholder this module does not know.
    """
    _validate(job)
    values = {
        "directives": "\n".join(f"#SBATCH {d}" for d in _directives(job)),
        "environment": "\n".join(_exports(job)),
        "port_base": str(SLURM_PORT_BASE),
        "port_span": str(SLURM_PORT_SPAN),
        "srun_args": "".join(f" {arg}" for arg in _srun_args(job)),
        "command": shlex.join(job.command),
        "exit_requeue": str(EX_TEMPFAIL),
        "requeue": "yes" if job.requeue else "no",
    }

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise UserError(f"sbatch template: unknown placeholder {{{{{name}}}}} (known: {', '.join(values)})")
        return values[name]

    return _PLACEHOLDER.sub(fill, template)


def parse_slurm_time(value: str) -> int:
    """Slurm's `--time` formats, in seconds: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.

    Raises:
        UserError: any other string.
    """
    match = _TIME.match(value.strip())
    if not match:
        raise UserError(f"--time={value!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is None:
        fields = [int(x) for x in (a, b, c) if x is not None]
        h, m, s = {1: (0, fields[0], 0), 2: (0, *fields), 3: tuple(fields)}[len(fields)]
        return h * 3600 + m * 60 + s
    return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)


def _validate(job: SlurmJob) -> None:
    if job.nodes < 1:
        raise UserError(f"--nodes={job.nodes} must be at least 1")
    if job.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node={job.gpus_per_node} must be at least 0")
    if job.num_tasks_per_node < 1:
        raise UserError(f"--ntasks-per-node={job.num_tasks_per_node} must be at least 1")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task={job.cpus_per_task} must be at least 1")
    if not 0 <= job.signal_grace <= 65535:
        raise UserError(f"--signal-grace={job.signal_grace} must be in [0, 65535] seconds (sbatch --signal)")
    if job.time is not None:
        limit = parse_slurm_time(job.time)
        if job.requeue and limit <= job.signal_grace:
            raise UserError(
                f"--time={job.time} ({limit} s) is not longer than --signal-grace={job.signal_grace} s: "
                "the checkpoint signal would come before any work"
            )
    if not re.fullmatch(r"[\w.+-]+", job.job_name):
        raise UserError(f"--job-name={job.job_name!r}: use letters, digits and ._+- only")
    for entry in job.env:
        name, sep, _ = entry.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise UserError(f"--env {entry!r}: expected NAME=VALUE")
    for arg in job.srun_args:
        if not arg.startswith("-"):
            raise UserError(f"--srun-arg {arg!r}: expected an srun option, e.g. --container-image=IMAGE")
    for entry in job.extra_sbatch:
        if not re.fullmatch(r"[a-z][a-z-]*(=.*)?", entry):
            raise UserError(f"--sbatch {entry!r}: expected an sbatch option without dashes, e.g. mem=32G or exclusive")


def _directives(job: SlurmJob) -> list[str]:
    out = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.num_tasks_per_node}",
    ]
    if job.gpus_per_node:
        out.append(f"--gpus-per-node={job.gpus_per_node}")
    optional = {
        "cpus-per-task": job.cpus_per_task,
        "partition": job.partition,
        "account": job.account,
        "qos": job.qos,
        "time": job.time,
        "constraint": job.constraint,
        "mem": job.mem,
    }
    out += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    # one log per job id; append so a requeued job keeps the earlier attempts above the new one
    out += [
        f"--chdir={job.workdir}",
        f"--output={job.log_dir}/%x-%j.out",
        "--open-mode=append",
    ]
    if job.requeue:
        out += [f"--signal=USR1@{job.signal_grace}", "--requeue"]
    else:
        out.append("--no-requeue")
    out += [f"--{entry}" for entry in job.extra_sbatch]
    return out


def _exports(job: SlurmJob) -> list[str]:
    lines = []
    if job.cpus_per_task is not None:
        lines.append(f"export OMP_NUM_THREADS={job.cpus_per_task}")
    for entry in job.env:
        name, _, value = entry.partition("=")
        lines.append(f"export {name}={shlex.quote(value)}")
    return lines


def _srun_args(job: SlurmJob) -> Sequence[str]:
    # srun of Slurm 22.05 to 23.02 does not inherit --cpus-per-task from sbatch: pass it on explicitly
    args = [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task is not None else []
    return [*args, *(shlex.quote(arg) for arg in job.srun_args)]
