"""`vimoe launch local|hostfile|slurm`: start the same config as N local ranks, over a DeepSpeed hostfile, or as a
Slurm batch job. Each form prints the exact command line it runs (or the sbatch script it renders) and `--dry-run`
stops there. The config is loaded and validated first, so a typo fails here and not on the cluster.

    vimoe launch local --nproc 2 --config configs/digits.yaml train.steps=50
    vimoe launch local --nproc 2 --launcher torchrun --max-restarts 1 --config configs/digits.yaml
    vimoe launch hostfile --hostfile launcher/deepspeed/hostfile --config configs/vimoe_s14_imagenet.yaml
    vimoe launch slurm --nodes 2 --gpus-per-node 8 --time 4:00:00 --submit --config configs/vimoe_s14_imagenet.yaml
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vimoe_dist.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from vimoe_dist.cli import add_config_args

    p = sub.add_parser(
        "launch",
        help="start a training job: N local ranks, a DeepSpeed hostfile, or a Slurm batch job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forms = p.add_subparsers(dest="form", metavar="FORM", required=True)

    local = forms.add_parser("local", help="N ranks on this machine (deepspeed launcher or torchrun)")
    local.add_argument("--nproc", type=int, required=True, help="number of ranks")
    local.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    local.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    local.add_argument(
        "--max-restarts", type=int, default=0, help="torchrun: restart all ranks up to N times when one fails"
    )
    _add_common(local)
    add_config_args(local)
    local.set_defaults(func=_local)

    hf = forms.add_parser("hostfile", help="the deepspeed launcher over the hosts of a DeepSpeed hostfile")
    hf.add_argument("--hostfile", required=True, metavar="FILE", help="lines of 'host slots=N'")
    group = hf.add_mutually_exclusive_group()
    group.add_argument("--include", metavar="SPEC", help="hosts/slots to use, e.g. 'node1@node2:0,2'")
    group.add_argument("--exclude", metavar="SPEC", help="hosts/slots to leave out, e.g. 'node2:1'")
    hf.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    hf.add_argument("--num-gpus", type=int, help="use the first G slots of each host")
    hf.add_argument("--master-addr", help="address of the first node (default: its 'hostname -I')")
    hf.add_argument("--master-port", type=int, help="rendezvous port (default: deepspeed's 29500)")
    hf.add_argument(
        "--backend",
        default="pdsh",
        help="how the launcher reaches the nodes: pdsh, openmpi, mvapich, slurm, mpich, impi (default: pdsh)",
    )
    hf.add_argument("--backend-args", metavar="ARGS", help="extra arguments for the backend, as one string")
    hf.add_argument("--ssh-port", type=int, help="ssh port of the nodes (pdsh)")
    hf.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="forward a variable to every rank (repeatable; NAME alone forwards its current value)",
    )
    hf.add_argument(
        "--no-ssh", action="store_true", help="start only this node's ranks; run the same command on every node"
    )
    hf.add_argument("--node-rank", type=int, help="with --no-ssh: this node's index in the hostfile")
    _add_common(hf)
    add_config_args(hf)
    hf.set_defaults(func=_hostfile)

    sl = forms.add_parser("slurm", help="render the sbatch script (launcher/slurm/) and print or submit it")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each (0: CPU-only)")
    sl.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: the GPUs per node, or 1)")
    sl.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (also sets OMP_NUM_THREADS)")
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
        help="extra #SBATCH line without dashes, e.g. --sbatch exclusive --sbatch mail-type=END",
    )
    sl.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="export before srun (repeatable), e.g. NCCL_DEBUG=WARN",
    )
    sl.add_argument(
        "--srun-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra srun option (repeatable), e.g. --srun-arg=--container-image=IMAGE for pyxis",
    )
    sl.add_argument("--log-dir", help="Slurm output directory (default: <run.out_dir>/slurm)")
    sl.add_argument("--workdir", help="working directory of the job (default: the current one)")
    sl.add_argument("--template", metavar="FILE", help="sbatch template (default: launcher/slurm/vimoe.sbatch.tmpl)")
    mode = sl.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="submit", action="store_false", help="print the script (default)")
    mode.add_argument("--submit", dest="submit", action="store_true", help="write the script and sbatch it")
    sl.add_argument("--wait", action="store_true", help="with --submit: wait for the job to end (sbatch --wait)")
    _add_common(sl)
    add_config_args(sl)
    sl.set_defaults(func=_slurm, submit=False)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the command line and do not run it")
    parser.add_argument(
        "--python",
        default=shlex.quote(sys.executable),
        help="interpreter command for the launcher and the ranks, e.g. 'apptainer exec --nv vimoe.sif python' "
        "(default: this one)",
    )


def _load(args: argparse.Namespace):
    from vimoe_dist.config import load_config

    return load_config(args.config, args.overrides)


def _check_world(cfg, world: int, ranks: str) -> None:
    """A layout that cannot work on the `world` ranks this launch starts fails here, before any rank starts
    (`ranks` says where the number comes from)."""
    from vimoe_dist.config import ConfigError, check_layout

    try:
        check_layout(cfg, world)
    except ConfigError as e:
        raise ConfigError(f"{e} ({ranks})") from None


def _local(args: argparse.Namespace) -> int:
    from vimoe_dist.launch.cmdline import build_deepspeed_local, build_torchrun

    cfg = _load(args)
    if args.launcher == "torchrun":
        cmd = build_torchrun(
            args.python,
            args.nproc,
            args.config,
            args.overrides,
            max_restarts=args.max_restarts,
            master_port=args.master_port,
        )
    else:
        if args.max_restarts:
            raise UserError("--max-restarts needs --launcher torchrun (the deepspeed launcher does not restart ranks)")
        cmd = build_deepspeed_local(args.python, args.nproc, args.config, args.overrides, master_port=args.master_port)
    _check_world(cfg, args.nproc, f"--nproc {args.nproc}")  # after the builders checked that it is positive
    return _exec(cmd, args.dry_run)


def _hostfile(args: argparse.Namespace) -> int:
    from vimoe_dist.launch.cmdline import build_deepspeed_hostfile
    from vimoe_dist.launch.hostfile import parse_hostfile

    cfg = _load(args)
    hosts = parse_hostfile(args.hostfile)
    cmd = build_deepspeed_hostfile(
        args.python,
        args.hostfile,
        args.config,
        args.overrides,
        include=args.include,
        exclude=args.exclude,
        num_nodes=args.num_nodes,
        num_gpus=args.num_gpus,
        master_addr=args.master_addr,
        master_port=args.master_port,
        backend=args.backend,
        backend_args=args.backend_args,
        ssh_port=args.ssh_port,
        no_ssh=args.no_ssh,
        node_rank=args.node_rank,
    )
    if args.no_ssh and args.node_rank >= len(hosts):
        raise UserError(f"--node-rank={args.node_rank} but {args.hostfile} lists {len(hosts)} hosts")
    if not (args.include or args.exclude):  # with them the launcher picks the slots; the ranks check themselves
        slots = list(hosts.values())[: args.num_nodes or len(hosts)]
        world = sum(min(n, args.num_gpus or n) for n in slots)
        _check_world(cfg, world, f"{world} ranks: the slots of {args.hostfile}")
    print(f"# hostfile {args.hostfile}: {len(hosts)} hosts, {sum(hosts.values())} slots", file=sys.stderr)
    if args.env:
        # the ranks on this node inherit the variables; the deepspeed launcher forwards the NAME=VALUE lines of
        # DS_ENV_FILE to the ranks it starts over pdsh/mpirun (with --no-ssh every node runs this command itself)
        pairs = [_env_entry(entry) for entry in args.env]
        prefix = ["env", *pairs]
        if not args.no_ssh:
            env_file = (Path(cfg.run.out_dir) / "launch" / "deepspeed_env").resolve()
            if not args.dry_run:
                env_file.parent.mkdir(parents=True, exist_ok=True)
                env_file.write_text("".join(f"{pair}\n" for pair in pairs))
            prefix.append(f"DS_ENV_FILE={env_file}")
        cmd = [*prefix, *cmd]
    return _exec(cmd, args.dry_run)


def _slurm(args: argparse.Namespace) -> int:
    from vimoe_dist.launch.cmdline import train_argv
    from vimoe_dist.launch.sbatch import SlurmJob, default_template, render_sbatch

    cfg = _load(args)
    workdir = Path(args.workdir or os.getcwd()).resolve()
    log_dir = Path(args.log_dir) if args.log_dir else Path(cfg.run.out_dir) / "slurm"
    log_dir = log_dir if log_dir.is_absolute() else workdir / log_dir
    # a file goes to the ranks as an absolute path; a shipped config's name as the name, which the ranks resolve in
    # their own environment (a container's, under --python "apptainer exec ...")
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    job = SlurmJob(
        command=train_argv(args.python, config, args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        constraint=args.constraint,
        mem=args.mem,
        job_name=args.job_name or f"vimoe-{Path(args.config).stem}",
        log_dir=str(log_dir),
        workdir=str(workdir),
        signal_grace=args.signal_grace,
        requeue=not args.no_requeue,
        extra_sbatch=args.sbatch,
        env=args.env,
        srun_args=args.srun_arg,
    )
    template = Path(args.template) if args.template else default_template()
    try:
        script = render_sbatch(job, template.read_text())
    except OSError as e:
        raise UserError(f"--template {template}: {e.strerror}") from None
    _check_world(
        cfg, job.nodes * job.num_tasks_per_node, f"--nodes {job.nodes} x {job.num_tasks_per_node} ranks per node"
    )
    if not args.submit:
        print(script, end="")
        return 0
    script_path = log_dir / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    cmd = ["sbatch", "--parsable", *(["--wait"] if args.wait else []), str(script_path)]
    if args.dry_run:
        print(script, end="")
        print(shlex.join(cmd), flush=True)
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot create the --output directory
    script_path.write_text(script)
    print(shlex.join(cmd), flush=True)
    try:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: run --submit on a Slurm login node, or use --print") from None
    job_id = result.stdout.strip().split(";")[0]
    if job_id:
        print(f"submitted job {job_id}: script {script_path}, log {log_dir}/{job.job_name}-{job_id}.out", flush=True)
    return result.returncode


def _env_entry(entry: str) -> str:
    name, sep, value = entry.partition("=")
    if not name.isidentifier():
        raise UserError(f"--env {entry!r}: expected NAME or NAME=VALUE")
    if not sep:
        if name not in os.environ:
            raise UserError(f"--env {name}: not set in this environment (give NAME=VALUE)")
        value = os.environ[name]
    return f"{name}={value}"


def _exec(cmd: list[str], dry_run: bool) -> int:
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    sys.stderr.flush()
    try:
        # replace this process: signals (Ctrl-C, Slurm's, torchrun's) and the exit code are the launcher's own
        os.execvp(cmd[0], cmd)
    except OSError as e:
        raise UserError(f"cannot run {cmd[0]}: {e.strerror}") from None
    return 0  # unreachable: execvp does not return
