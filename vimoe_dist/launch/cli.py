"""`vimoe launch local|hostfile|slurm`: start the same config as N local ranks, over a DeepSpeed hostfile, or as a
Slurm batch job. Each form prints the exact command line it runs (or the sbatch script it renders) and `--dry-run`
stops there. First it runs the checks `vimoe train` makes before building the model (vimoe_dist/preflight.py:
config, layout for the ranks it starts, devices where it knows them, data paths and manifests), so a mistake fails
here and not on the cluster; `--no-data-check` leaves the data to the ranks (node-local disks).
`vimoe launch monitoring` writes the Prometheus and Grafana files for these jobs.

    vimoe launch local --nproc 2 --config configs/digits.yaml train.steps=50
    vimoe launch local --nproc 2 --launcher torchrun --max-restarts 1 --config configs/digits.yaml
    vimoe launch hostfile --hostfile launcher/deepspeed/hostfile --config configs/vimoe_s14_imagenet.yaml
    vimoe launch slurm --nodes 2 --gpus-per-node 8 --time 4:00:00 --submit --config configs/vimoe_s14_imagenet.yaml

Ctrl-C (or SIGTERM) while a job runs reaches the ranks once, they checkpoint and stop, and `vimoe launch` ends
with one line and exit 130 (143); a second Ctrl-C stops everything at once.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from functools import partial

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
        help="give a variable to every rank (repeatable; NAME alone: its value here). Values are never printed: "
        "they go to the ranks in RUN/launch/job.json, mode 0600",
    )
    hf.add_argument(
        "--no-ssh", action="store_true", help="start only this node's ranks; run the same command on every node"
    )
    hf.add_argument("--node-rank", type=int, help="with --no-ssh: this node's index in the hostfile")
    _add_common(hf)
    add_config_args(hf)
    hf.set_defaults(func=_hostfile)

    from vimoe_dist.launch.slurm_cli import add_monitoring_parser, add_slurm_parser

    add_slurm_parser(forms, _add_common, add_config_args)
    add_monitoring_parser(forms)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the command line and do not run it")
    parser.add_argument(
        "--no-data-check",
        dest="data_check",
        action="store_false",
        help="do not check data.train/data.val here (data on the nodes' own disks); the ranks still do",
    )
    parser.add_argument(
        "--python",
        default=None,
        help="interpreter command for the launcher and the ranks, e.g. 'apptainer exec --nv vimoe.sif python' "
        "(default: this one; in a --container-image, the image's python)",
    )


def default_python() -> str:
    return shlex.quote(sys.executable)


def load(args: argparse.Namespace):
    from vimoe_dist.config import load_config

    return load_config(args.config, args.overrides)


def check_world(cfg, world: int | None, ranks: str, data: bool = True, **devices) -> str:
    """The checks `vimoe train` makes before it builds the model, for the `world` ranks this launch starts (None:
    the launcher cannot count them), before any rank starts: a layout that cannot work names `ranks` (where the
    number comes from). `devices` are `preflight`'s `local_ranks` or `gpus_per_node`, where this launch knows them.
    Returns one line saying what was checked, which the launcher prints once nothing else can fail."""
    from vimoe_dist.config import ConfigError, check_layout
    from vimoe_dist.preflight import preflight

    if world is not None:
        try:
            check_layout(cfg, world)
        except ConfigError as e:
            raise ConfigError(f"{e} ({ranks})") from None
    report = preflight(cfg, world, data=data, **devices)
    checked = [ranks, f"run.device {cfg.run.device}" + (f" ({report.device} here)" if report.device else "")]
    checked.append(report.data.describe() if report.data else "data not checked here (--no-data-check)")
    return f"# checked: {'; '.join(checked)}"


def _local(args: argparse.Namespace) -> int:
    from vimoe_dist.launch.cmdline import build_deepspeed_local, build_torchrun
    from vimoe_dist.launch.supervise import deepspeed_targets

    cfg = load(args)
    python = args.python or default_python()
    if args.launcher == "torchrun":
        restarts, port = args.max_restarts, args.master_port
        cmd = build_torchrun(python, args.nproc, args.config, args.overrides, max_restarts=restarts, master_port=port)
        targets = None
    else:
        if args.max_restarts:
            raise UserError("--max-restarts needs --launcher torchrun (the deepspeed launcher does not restart ranks)")
        cmd = build_deepspeed_local(python, args.nproc, args.config, args.overrides, master_port=args.master_port)
        targets = partial(deepspeed_targets, backend="local")
    # after the builders checked that --nproc is positive; the ranks run here, so their devices are checked here
    checked = check_world(cfg, args.nproc, f"--nproc {args.nproc}", args.data_check, local_ranks=args.nproc)
    return _run(cmd, args.dry_run, name=args.launcher, targets=targets, checked=checked)


def _hostfile(args: argparse.Namespace) -> int:
    from vimoe_dist.launch import jobspec
    from vimoe_dist.launch.cmdline import build_deepspeed_hostfile, train_args
    from vimoe_dist.launch.hostfile import parse_hostfile
    from vimoe_dist.launch.pdsh import check_runner_environment
    from vimoe_dist.launch.supervise import deepspeed_targets

    cfg = load(args)
    hosts = parse_hostfile(args.hostfile)
    env = dict(_env_entry(entry) for entry in args.env)
    # without --no-ssh the launcher starts ranks on other nodes: their arguments and variables travel in a file
    job_file = None if args.no_ssh else jobspec.job_file(cfg.run.out_dir)
    cmd = build_deepspeed_hostfile(
        args.python or default_python(),
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
        job_file=None if job_file is None else str(job_file),
    )
    if args.no_ssh and args.node_rank >= len(hosts):
        raise UserError(f"--node-rank={args.node_rank} but {args.hostfile} lists {len(hosts)} hosts")
    world, ranks = None, "--include/--exclude: the ranks check their layout"
    if not (args.include or args.exclude):  # with them the launcher picks the slots; the ranks check themselves
        slots = list(hosts.values())[: args.num_nodes or len(hosts)]
        world = sum(min(n, args.num_gpus or n) for n in slots)
        ranks = f"{world} ranks: the slots of {args.hostfile}"
    here = list(hosts.values())[args.node_rank] if args.no_ssh else None  # this node's ranks, with --no-ssh
    local = {"local_ranks": min(here, args.num_gpus or here)} if here is not None else {}
    checked = check_world(cfg, world, ranks, args.data_check, **local)
    # --no-ssh: this node's ranks inherit the variables from the runner. Otherwise they travel in the job file only:
    # in the runner's environment, DeepSpeed would forward an NCCL_*/PYTHON*/UCX_* one through the remote shell
    runner_env = {**os.environ, **env} if args.no_ssh else dict(os.environ)
    if args.backend == "pdsh" and not args.no_ssh:
        check_runner_environment(runner_env, os.getcwd())
    print(f"# hostfile {args.hostfile}: {len(hosts)} hosts, {sum(hosts.values())} slots", file=sys.stderr)
    if job_file is not None:
        argv = train_args(args.config, args.overrides)
        print(f"# the ranks run: vimoe_dist {shlex.join(argv)} (from {job_file}, mode 0600)", file=sys.stderr)
        if not args.dry_run:
            jobspec.write_job_file(job_file, argv, env)
    if env:
        print(f"# variables given to every rank (values not shown): {', '.join(env)}", file=sys.stderr)
    return _run(
        cmd,
        args.dry_run,
        name="deepspeed",
        env=runner_env,
        targets=partial(deepspeed_targets, backend="local" if args.no_ssh else args.backend),
        checked=checked,
    )


def _env_entry(entry: str) -> tuple[str, str]:
    from vimoe_dist.launch.quoting import split_env_entry

    name, value = split_env_entry(entry, value_required=False)
    if value is None:
        if name not in os.environ:
            raise UserError(f"--env {name}: not set in this environment (give NAME=VALUE)")
        name, value = split_env_entry(f"{name}={os.environ[name]}", value_required=True)
    return name, value or ""


def _run(
    cmd: list[str], dry_run: bool, *, name: str, env: dict[str, str] | None = None, targets=None, checked: str = ""
) -> int:
    from vimoe_dist.launch.supervise import run_supervised

    if checked:
        print(checked, file=sys.stderr, flush=True)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    sys.stderr.flush()
    return run_supervised(cmd, name=name, env=env, targets=targets)
