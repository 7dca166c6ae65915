"""The `slurm` and `monitoring` forms of `vimoe launch` (registered by `vimoe_dist.launch.cli`): a Slurm job built
from the options and the config, rendered from a shipped template, printed or submitted; and the monitoring files
written out of the package for Prometheus and Grafana.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from vimoe_dist.errors import UserError


def add_slurm_parser(forms: argparse._SubParsersAction, add_common, add_config_args) -> None:
    sl = forms.add_parser("slurm", help="render the shipped sbatch template and print or submit it")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each (0: CPU-only)")
    sl.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: the GPUs per node, or 1)")
    sl.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPU cores per rank (default: data.num_workers + 2); OMP_NUM_THREADS gets those the loader workers "
        "do not take",
    )
    sl.add_argument("--exclusive", action="store_true", help="whole nodes for this job (#SBATCH --exclusive)")
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--qos")
    sl.add_argument("--time", help="time limit (Slurm format, e.g. 4:00:00); the job checkpoints and requeues")
    sl.add_argument("--constraint")
    sl.add_argument("--mem", help="memory per node (Slurm format, e.g. 64G)")
    sl.add_argument("--job-name", help="default: vimoe-<config name>")
    sl.add_argument(
        "--signal-grace",
        type=int,
        default=120,
        metavar="SECONDS",
        help="send SIGUSR1 this long before the time limit so the ranks can checkpoint (default 120)",
    )
    sl.add_argument("--no-requeue", action="store_true", help="no checkpoint signal and no requeue")
    sl.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION[=VALUE]",
        help="extra #SBATCH line without dashes, e.g. --sbatch mail-type=END",
    )
    sl.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="export before srun (repeatable); NAME alone passes the submitting shell's value on without writing "
        "it into the script. NCCL_DEBUG defaults to WARN; NCCL_*, UCX_* and FI_* of this shell are passed on",
    )
    sl.add_argument(
        "--container-image",
        metavar="IMAGE",
        help="run the ranks in this container with pyxis (srun --container-image), e.g. nvcr.io#org/vimoe:1 or "
        "/shared/vimoe.sqsh; the job's directory is mounted at the same path",
    )
    sl.add_argument(
        "--container-opt",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="a pyxis option without dashes (repeatable), e.g. container-mounts=/data:/data, container-writable",
    )
    sl.add_argument("--srun-arg", action="append", default=[], metavar="OPTION", help="extra srun option (repeatable)")
    sl.add_argument(
        "--prometheus-sd-dir",
        metavar="DIR",
        help="Prometheus file_sd directory: the job links DIR/$SLURM_JOB_ID.json to the run's "
        "prometheus_targets.json while it runs (see `vimoe launch monitoring`)",
    )
    sl.add_argument("--log-dir", help="Slurm output directory (default: <run.out_dir>/slurm)")
    sl.add_argument("--workdir", help="working directory of the job (default: the current one)")
    sl.add_argument(
        "--template", metavar="NAME|FILE", help="a shipped sbatch template (default: vimoe) or a file of your own"
    )
    mode = sl.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="submit", action="store_false", help="print the script (default)")
    mode.add_argument("--submit", dest="submit", action="store_true", help="write the script and sbatch it")
    sl.add_argument("--wait", action="store_true", help="with --submit: wait for the job to end (sbatch --wait)")
    add_common(sl)
    add_config_args(sl)
    sl.set_defaults(func=_slurm, submit=False)


def add_monitoring_parser(forms: argparse._SubParsersAction) -> None:
    mon = forms.add_parser(
        "monitoring", help="write the Prometheus scrape config, alert rules and Grafana dashboard into a directory"
    )
    mon.add_argument("--out", required=True, metavar="DIR")
    mon.add_argument(
        "--sd-dir",
        metavar="DIR",
        help="the file_sd directory Prometheus reads, the --prometheus-sd-dir of `vimoe launch slurm` "
        "(default: /shared/prometheus/vimoe)",
    )
    mon.add_argument("--force", action="store_true", help="overwrite files that exist")
    mon.set_defaults(func=_monitoring)


def _slurm(args: argparse.Namespace) -> int:
    from vimoe_dist.launch import submit
    from vimoe_dist.launch.cli import check_world, default_python, load
    from vimoe_dist.launch.cmdline import train_argv
    from vimoe_dist.launch.quoting import one_line
    from vimoe_dist.launch.resources import load_template
    from vimoe_dist.launch.sbatch import SlurmJob, render_sbatch, site_environment

    cfg = load(args)
    workdir = Path(one_line("--workdir", args.workdir or os.getcwd())).resolve()
    log_dir = Path(one_line("--log-dir", args.log_dir)) if args.log_dir else Path(cfg.run.out_dir) / "slurm"
    log_dir = log_dir if log_dir.is_absolute() else workdir / log_dir
    run_dir = Path(cfg.run.out_dir) if Path(cfg.run.out_dir).is_absolute() else workdir / cfg.run.out_dir
    # a file goes to the ranks as an absolute path; a shipped config's name as the name, which the ranks resolve in
    # their own environment (a container's, under --python "apptainer exec ...")
    spec = one_line("--config", args.config)
    config = str(Path(spec).resolve()) if Path(spec).is_file() else spec
    python = args.python or ("python" if args.container_image else default_python())
    cpus = args.cpus_per_task if args.cpus_per_task is not None else cfg.data.num_workers + 2
    sd_dir = _prometheus_sd_dir(args.prometheus_sd_dir, cfg, workdir)
    job = SlurmJob(
        command=train_argv(python, config, args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=cpus,
        # DataLoader workers run one thread each (torch sets it); the training process gets the other cores
        omp_num_threads=max(1, cpus - cfg.data.num_workers),
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        constraint=args.constraint,
        mem=args.mem,
        exclusive=args.exclusive,
        job_name=args.job_name or f"vimoe-{Path(args.config).stem}",
        log_dir=str(log_dir),
        workdir=str(workdir),
        signal_grace=args.signal_grace,
        requeue=not args.no_requeue,
        extra_sbatch=args.sbatch,
        env=_env_entries(args.env),
        site_env=site_environment(os.environ),
        srun_args=args.srun_arg,
        container_image=args.container_image,
        container_opts=args.container_opt,
        run_dir=str(run_dir),
        prometheus_sd_dir=sd_dir,
    )
    script = render_sbatch(job, load_template(args.template))
    world = job.nodes * job.num_tasks_per_node
    ranks = f"--nodes {job.nodes} x {job.num_tasks_per_node} ranks per node"
    checked = check_world(cfg, world, ranks, args.data_check, gpus_per_node=job.gpus_per_node)
    _check_cores(job, args.partition)
    if sd_dir is not None and cfg.metrics.addr in ("127.0.0.1", "localhost", "::1"):
        print(
            f"# warning: metrics.addr={cfg.metrics.addr}: a Prometheus on another host cannot scrape the ranks; "
            "set metrics.addr=0.0.0.0 on a network you trust (the endpoint has no authentication)",
            file=sys.stderr,
        )
    if not args.submit:
        print(checked, file=sys.stderr, flush=True)
        print(script, end="")
        return 0
    script_path = log_dir / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    if args.dry_run:
        print(checked, file=sys.stderr, flush=True)
        print(script, end="")
        print(" ".join(submit.sbatch_command(script_path, wait=args.wait)), flush=True)
        return 0
    result = submit.submit(script, script_path, wait=args.wait, make_dirs=[log_dir])
    if result.job_id is not None:
        print(checked, file=sys.stderr, flush=True)
        log = log_dir / job.log_name.replace("%x", job.job_name).replace("%j", str(result.job_id))
        print(f"submitted job {result.job_id}: script {script_path}, log {log}", flush=True)
    return result.returncode


def _env_entries(entries: list[str]) -> list[str]:
    """NAME=VALUE entries as given; NAME alone is passed on by name (`export NAME` in the script, its value from
    the job's environment, which sbatch copies from this shell), so no secret is written into the script."""
    from vimoe_dist.launch.quoting import split_env_entry

    out = []
    for entry in entries:
        name, value = split_env_entry(entry, value_required=False)
        if value is None and name not in os.environ:
            raise UserError(f"--env {name}: not set in this environment (give NAME=VALUE)")
        out.append(entry)
    return out


def _prometheus_sd_dir(value: str | None, cfg, workdir: Path) -> str | None:
    if value is None:
        return None
    if cfg.metrics.port == 0:
        raise UserError("--prometheus-sd-dir: metrics.port is 0, so the ranks serve no metrics (set metrics.port)")
    path = Path(value)
    return str(path if path.is_absolute() else workdir / path)


def _check_cores(job, partition: str | None) -> None:
    """Where `sinfo` answers: the cores asked of one node must exist on some node of the partition."""
    from vimoe_dist.launch.submit import max_node_cpus

    wanted = job.cpus_per_task * job.num_tasks_per_node
    have = max_node_cpus(partition)
    if have is not None and wanted > have:
        where = f"partition {partition}" if partition else "the default partition"
        raise UserError(
            f"--cpus-per-task={job.cpus_per_task} x {job.num_tasks_per_node} tasks per node = {wanted} cores, but "
            f"the largest node of {where} has {have} (sinfo); lower --cpus-per-task or data.num_workers"
        )


def _monitoring(args: argparse.Namespace) -> int:
    from vimoe_dist.launch.resources import write_monitoring

    written = write_monitoring(Path(args.out), args.sd_dir, force=args.force)
    for path in written:
        print(path)
    return 0
