"""Slurm batch scripts rendered from the shipped template `templates/vimoe.sbatch.tmpl` (or a user's own).

The template holds the job's logic (rendezvous, srun, Prometheus targets, requeue on exit 75); this module fills in
the `#SBATCH` directives, the environment and the rank command. One task per GPU (`--ntasks-per-node` defaults to
the GPUs per node; on CPU-only clusters it alone sets the ranks), `srun` starts the ranks, each rank resolves its
place from the `SLURM_*` variables (`vimoe_dist.parallel.env`).

Every value is checked or quoted for the reader it goes to (`vimoe_dist.launch.quoting`): Slurm names and sizes
must have Slurm's syntax, paths and free-form option values are quoted for sbatch's `#SBATCH` parser, and whatever
reaches bash goes through `shlex.quote`; no value may hold a control character.

Resources a site expects: `--cpus-per-task` (default `data.num_workers + 2` per rank: the loader workers, the
training process and one spare), repeated on srun (Slurm 22.05-23.02 srun does not inherit it), with
`OMP_NUM_THREADS` set to the cores the workers do not take; `--exclusive`; `NCCL_DEBUG=WARN` unless the
environment sets it; the submitting shell's `NCCL_*`, `UCX_*` and `FI_*` variables written into the script (each
only where the job's environment lacks it, so a site that submits with `--export=NONE` still gets them), and
`srun --export=ALL` so they reach the ranks; pyxis containers (`--container-image`).

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
from collections.abc import Mapping
from dataclasses import dataclass, field

from vimoe_dist.errors import UserError
from vimoe_dist.launch import quoting as q
from vimoe_dist.launch.rendezvous import SLURM_PORT_BASE, SLURM_PORT_SPAN

EX_TEMPFAIL = 75  # the trainer's "checkpointed after a signal, requeue me" exit code
# variables of the submitting shell that the job writes into its script: the site's network settings
SITE_ENV_PREFIXES = ("NCCL_", "UCX_", "FI_")
# pyxis' srun options besides --container-image (pyxis args.c); True: takes a value
PYXIS_OPTIONS = {
    "container-mounts": True,
    "container-workdir": True,
    "container-name": True,
    "container-save": True,
    "container-env": True,
    "container-mount-home": False,
    "no-container-mount-home": False,
    "container-remap-root": False,
    "no-container-remap-root": False,
    "container-entrypoint": False,
    "no-container-entrypoint": False,
    "container-entrypoint-log": False,
    "container-writable": False,
    "container-readonly": False,
}

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
    omp_num_threads: int | None = None  # None: cpus_per_task when that is set
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool = False
    job_name: str = "vimoe"
    log_dir: str = "logs"
    log_name: str = "%x-%j.out"  # sbatch's filename pattern inside log_dir (%x job name, %j id, %A_%a arrays)
    workdir: str = "."
    signal_grace: int = 120
    requeue: bool = True
    extra_sbatch: list[str] = field(default_factory=list)  # "key=value" or "flag" -> "#SBATCH --key=value"
    env: list[str] = field(default_factory=list)  # "NAME=VALUE" exported before srun; "NAME": the job's own value
    site_env: dict[str, str] = field(default_factory=dict)  # NCCL_*/UCX_*/FI_* kept when the job's env lacks them
    srun_args: list[str] = field(default_factory=list)  # any further srun option
    container_image: str | None = None  # pyxis --container-image
    container_opts: list[str] = field(default_factory=list)  # pyxis options without dashes: "container-mounts=/d:/d"
    run_dir: str = ""  # the run's directory (run.out_dir), where rank 0 writes prometheus_targets.json
    prometheus_sd_dir: str | None = None  # link DIR/$SLURM_JOB_ID.json to the run's targets while the job runs

    @property
    def num_tasks_per_node(self) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


def site_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The site's NCCL_*, UCX_* and FI_* variables of `environ`, which the job passes on to its ranks."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith(SITE_ENV_PREFIXES) and q.ENV_NAME.fullmatch(k)}


def render_sbatch(job: SlurmJob, template: str) -> str:
    """Fills `template` for `job`.

    Raises:
        UserError: an impossible request (no nodes or tasks, a bad `--time`, a grace longer than the time limit), a
            value Slurm would not accept or that holds a control character, or a template placeholder this module
            does not know.
    """
    _validate(job)
    values = {
        "directives": "\n".join(f"#SBATCH {d}" for d in _directives(job)),
        "environment": "\n".join(_exports(job)),
        "port_base": str(SLURM_PORT_BASE),
        "port_span": str(SLURM_PORT_SPAN),
        "srun_args": "".join(f" {shlex.quote(arg)}" for arg in _srun_args(job)),
        "command": shlex.join(job.command),
        "exit_requeue": str(EX_TEMPFAIL),
        "requeue": "yes" if job.requeue else "no",
        "run_dir": shlex.quote(job.run_dir),
        "prometheus_sd_dir": shlex.quote(job.prometheus_sd_dir or ""),
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
    match = _TIME.match(q.one_line("--time", value).strip())
    if not match:
        raise UserError(f"--time={value!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is None:
        fields = [int(x) for x in (a, b, c) if x is not None]
        h, m, s = {1: (0, fields[0], 0), 2: (0, *fields), 3: tuple(fields)}[len(fields)]
        return h * 3600 + m * 60 + s
    return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)


def split_container_opt(entry: str) -> tuple[str, str | None]:
    """`container-mounts=/data:/data` -> (`container-mounts`, `/data:/data`), checked against pyxis' options.

    Raises:
        UserError: an option pyxis does not have, a missing or surplus value, a control character.
    """
    name, sep, value = q.one_line("--container-opt", entry).removeprefix("--").partition("=")
    if name == "container-image":
        raise UserError("--container-opt container-image: use --container-image IMAGE")
    if name not in PYXIS_OPTIONS:
        raise UserError(f"--container-opt {entry!r}: not a pyxis option (known: {', '.join(PYXIS_OPTIONS)})")
    if PYXIS_OPTIONS[name] and not (sep and value):
        raise UserError(f"--container-opt {name}: needs a value, e.g. {name}=...")
    if not PYXIS_OPTIONS[name] and sep:
        raise UserError(f"--container-opt {name}: takes no value (got {value!r})")
    return name, (value if sep else None)


def _validate(job: SlurmJob) -> None:
    if job.nodes < 1:
        raise UserError(f"--nodes={job.nodes} must be at least 1")
    if job.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node={job.gpus_per_node} must be at least 0")
    if job.num_tasks_per_node < 1:
        raise UserError(f"--ntasks-per-node={job.num_tasks_per_node} must be at least 1")
    for flag, value in (("--cpus-per-task", job.cpus_per_task), ("OMP_NUM_THREADS", job.omp_num_threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag}={value} must be at least 1")
    if not 0 <= job.signal_grace <= 65535:
        raise UserError(f"--signal-grace={job.signal_grace} must be in [0, 65535] seconds (sbatch --signal)")
    if job.time is not None:
        limit = parse_slurm_time(job.time)
        if job.requeue and limit <= job.signal_grace:
            raise UserError(
                f"--time={job.time} ({limit} s) is not longer than --signal-grace={job.signal_grace} s: "
                "the checkpoint signal would come before any work"
            )
    q.matching("--job-name", job.job_name, re.compile(r"[\w.+-]+"), "letters, digits and ._+- only")
    names = {"--partition": (job.partition, q.SLURM_NAME_LIST), "--account": (job.account, q.SLURM_NAME),
             "--qos": (job.qos, q.SLURM_NAME)}  # fmt: skip
    for flag, (value, pattern) in names.items():
        if value is not None:
            q.matching(flag, value, pattern, "a Slurm name (letters, digits and _.+-; partitions: a comma list)")
    if job.mem is not None:
        q.matching("--mem", job.mem, q.SLURM_MEM, "a size in megabytes, or with the unit K, M, G or T (e.g. 64G)")
    if job.constraint is not None:
        q.matching("--constraint", job.constraint, q.SLURM_CONSTRAINT, "features joined by & | , (no spaces)")
    q.all_one_line("a path", [job.log_dir, job.log_name, job.workdir, job.run_dir, job.prometheus_sd_dir or ""])
    q.all_one_line("the rank command", job.command)
    for entry in job.env:
        q.split_env_entry(entry, value_required=False)
    for name, value in job.site_env.items():
        q.export_line(name, value)
    for arg in job.srun_args:
        if not q.one_line("--srun-arg", arg).startswith("-"):
            raise UserError(f"--srun-arg {arg!r}: expected an srun option, e.g. --mpi=pmix")
    for entry in job.extra_sbatch:
        option, _, _ = q.one_line("--sbatch", entry).partition("=")
        if not q.SBATCH_OPTION.fullmatch(option):
            raise UserError(f"--sbatch {entry!r}: expected an sbatch option without dashes, e.g. mem=32G or exclusive")
    if job.container_image is not None:
        q.one_line("--container-image", job.container_image)
        if not job.container_image or job.container_image.startswith("-"):
            raise UserError(f"--container-image {job.container_image!r}: expected an image or a .sqsh path")
    opts = {split_container_opt(entry)[0] for entry in job.container_opts}
    if job.container_image is not None and "container-mounts" not in opts and re.search("[,:]", job.workdir):
        raise UserError(
            f"--workdir {job.workdir!r}: pyxis reads ',' and ':' in a mount as separators, so the job's directory "
            "cannot be mounted into the container by default; give --container-opt container-mounts=SRC:DST"
        )
    if job.container_opts and job.container_image is None:
        raise UserError("--container-opt needs --container-image (pyxis options apply to a container)")


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
    out += [f"--{key}={q.sbatch_word(str(value))}" for key, value in optional.items() if value is not None]
    if job.exclusive:
        out.append("--exclusive")
    # one log per job id; append so a requeued job keeps the earlier attempts above the new one
    out += [
        f"--chdir={q.sbatch_word(job.workdir)}",
        f"--output={q.sbatch_word(q.slurm_filename(job.log_dir) + '/' + job.log_name)}",
        "--open-mode=append",
    ]
    if job.requeue:
        out += [f"--signal=USR1@{job.signal_grace}", "--requeue"]
    else:
        out.append("--no-requeue")
    for entry in job.extra_sbatch:
        option, sep, value = entry.partition("=")
        out.append(f"--{option}={q.sbatch_word(value)}" if sep else f"--{option}")
    return out


def _exports(job: SlurmJob) -> list[str]:
    lines = []
    omp = job.omp_num_threads if job.omp_num_threads is not None else job.cpus_per_task
    if omp is not None:
        lines.append(f"export OMP_NUM_THREADS={omp}")
    lines.append('export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"')
    if job.gpus_per_node:  # the ranks refuse to fall back to the CPU when this job's GPUs are not usable
        lines.append(f"export VIMOE_GPUS_PER_NODE={job.gpus_per_node}")
    for name, value in job.site_env.items():
        lines.append(f'[ -n "${{{name}+set}}" ] || {q.export_line(name, value)}')
    for entry in job.env:
        name, value = q.split_env_entry(entry, value_required=False)
        if value is None:  # named, not written: sbatch gives the job the submitting shell's value
            warn = f'echo "vimoe: warning: {name} is not set in the job\'s environment" >&2'
            lines.append(f'if [ -n "${{{name}+set}}" ]; then export {name}; else {warn}; fi')
        else:
            lines.append(q.export_line(name, value))
    return lines


def _srun_args(job: SlurmJob) -> list[str]:
    # srun of Slurm 22.05 to 23.02 does not inherit --cpus-per-task from sbatch: pass it on explicitly
    args = [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task is not None else []
    if job.container_image is not None:
        args.append(f"--container-image={job.container_image}")
        opts = [split_container_opt(entry) for entry in job.container_opts]
        given = {name for name, _ in opts}
        # the job's directory inside the container at the same path, so the config, data paths under it and the
        # run directory mean the same thing inside and out (a mount of one's own replaces this)
        if "container-mounts" not in given:
            args.append(f"--container-mounts={job.workdir}:{job.workdir}")
        if "container-workdir" not in given:
            args.append(f"--container-workdir={job.workdir}")
        args += [f"--{name}={value}" if value is not None else f"--{name}" for name, value in opts]
    return [*args, *job.srun_args]
