"""Command lines for the launchers: torchrun, the deepspeed launcher (local or over a hostfile) and one rank's
`vimoe train`. Each builder returns an argv list; `vimoe launch` prints it with `shlex.join` and runs exactly that.

Every launcher is started as `python -m <module>` with the caller's interpreter, so the ranks run in the same
environment as `vimoe launch` whatever is first on PATH. `python` is a shell-quoted command, so a container wrapper
works too (`apptainer exec --nv vimoe.sif python`). No value is ever joined into a string a shell parses: argv
lists go to exec, and printed ones through `shlex.join`; values with control characters are refused.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from vimoe_dist.errors import UserError
from vimoe_dist.launch import jobspec
from vimoe_dist.launch.quoting import HOST, all_one_line, matching, one_line
from vimoe_dist.net import free_port

# The deepspeed launcher would put `--local_rank=N` right after the module name (`python -m vimoe_dist --local_rank=1
# train ...`), before the subcommand; `--no_local_rank` leaves it out and the ranks read LOCAL_RANK, which the
# launcher sets as well.
DEEPSPEED_BACKENDS = ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi")
# --include/--exclude of the deepspeed launcher: host[:slot,...] joined by @
_RESOURCES = re.compile(rf"{HOST.pattern}(?::\d+(?:,\d+)*)?(?:@{HOST.pattern}(?::\d+(?:,\d+)*)?)*")
_ADDRESS = re.compile(rf"{HOST.pattern}|[0-9A-Fa-f:.]+")


def train_argv(python: str, config: str, overrides: Sequence[str]) -> list[str]:
    """One rank of the job: `python -m vimoe_dist train --config FILE key=value ...`."""
    return [*python_argv(python), "-m", "vimoe_dist", *train_args(config, overrides)]


def python_argv(python: str) -> list[str]:
    """The interpreter command, split like a shell would (`apptainer exec --nv img.sif python` is three words)."""
    one_line("--python", python)
    try:
        argv = shlex.split(python)
    except ValueError as e:
        raise UserError(f"--python {python!r}: {e}") from None
    if not argv:
        raise UserError("--python is empty")
    return argv


def train_args(config: str, overrides: Sequence[str]) -> list[str]:
    one_line("--config", config)
    all_one_line("override", overrides)
    return ["train", "--config", config, *overrides]


TORCHRUN_MODULE = "vimoe_dist.parallel.torchrun"  # torchrun with a one-line exit on SIGINT/SIGTERM


def build_torchrun(
    python: str,
    nproc: int,
    config: str,
    overrides: Sequence[str],
    *,
    max_restarts: int = 0,
    master_port: int | None = None,
) -> list[str]:
    """torchrun on this machine (`torch.distributed.run`, through `vimoe_dist.parallel.torchrun` for a one-line exit on
    a signal). Without a port it runs `--standalone` (a c10d rendezvous on a free local port); `--max-restarts`
    restarts every rank from scratch when one dies, and the restarted job resumes from its latest checkpoint
    (`run.resume=auto`).

    With restarts the command runs under `env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`: by default the agent keeps one
    TCP store for every rendezvous round and torch's `env://` init no longer prefixes the workers' keys by attempt,
    so the restarted ranks read the dead ranks' gloo addresses of the first attempt and fail to connect ("Connection
    refused" in `new_group`). Without sharing, each round gets a fresh store.
    """
    _check_positive("--nproc", nproc)
    if max_restarts < 0:
        raise UserError(f"--max-restarts={max_restarts} must be at least 0")
    cmd = [*python_argv(python), "-m", TORCHRUN_MODULE, f"--nproc-per-node={nproc}", "--nnodes=1"]
    if master_port is None:
        cmd.append("--standalone")
    else:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={_port(master_port)}"]
    cmd.append(f"--max-restarts={max_restarts}")
    if max_restarts:
        cmd = ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", *cmd]
    return [*cmd, "-m", "vimoe_dist", *train_args(config, overrides)]


def build_deepspeed_local(
    python: str, nproc: int, config: str, overrides: Sequence[str], *, master_port: int | None = None
) -> list[str]:
    """The deepspeed launcher on this machine with `nproc` ranks (`--num_gpus` counts CPU ranks on a CPU machine).
    The port is always explicit: deepspeed's default (29500) makes two jobs on one machine collide.
    """
    _check_positive("--nproc", nproc)
    port = free_port() if master_port is None else _port(master_port)
    return [
        *python_argv(python), "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={port}", "--no_local_rank", "--module", "vimoe_dist", *train_args(config, overrides),
    ]  # fmt: skip


def build_deepspeed_hostfile(
    python: str,
    hostfile: str,
    config: str,
    overrides: Sequence[str],
    *,
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    backend: str = "pdsh",
    backend_args: str | None = None,
    ssh_port: int | None = None,
    no_ssh: bool = False,
    node_rank: int | None = None,
    job_file: str | None = None,
) -> list[str]:
    """The deepspeed launcher over the hosts of a DeepSpeed hostfile. With `no_ssh`, every node runs this same
    command with its own `node_rank` (clusters whose scheduler starts one agent per node), and `master_addr` is then
    required since no node can look the first host up for the others. With `job_file`, the ranks run
    `python -m vimoe_dist.launch.jobspec JOB_FILE`, which holds their arguments (`config`, `overrides`) and
    variables: nothing a user typed then reaches the runner's remote command (`vimoe_dist.launch.pdsh`).
    """
    one_line("--hostfile", hostfile)
    if include:
        matching("--include", include, _RESOURCES, "host[:slot,...][@host[:slot,...]...], e.g. node1@node2:0,2")
    if exclude:
        matching("--exclude", exclude, _RESOURCES, "host[:slot,...][@host[:slot,...]...], e.g. node2:1")
    if master_addr:
        matching("--master-addr", master_addr, _ADDRESS, "a host name or IP address")
    if backend_args:
        one_line("--backend-args", backend_args)
        try:
            shlex.split(backend_args)
        except ValueError as e:
            raise UserError(f"--backend-args {backend_args!r}: {e}") from None
    if include and exclude:
        raise UserError("--include and --exclude are mutually exclusive (the deepspeed launcher refuses both)")
    if backend not in DEEPSPEED_BACKENDS:
        raise UserError(f"--backend={backend!r} is not one of {', '.join(DEEPSPEED_BACKENDS)}")
    if no_ssh and node_rank is None:
        raise UserError("--no-ssh needs --node-rank (this node's index in the hostfile)")
    if node_rank is not None and not no_ssh:
        raise UserError("--node-rank is only meaningful with --no-ssh")
    if no_ssh and not master_addr:
        raise UserError("--no-ssh needs --master-addr (the address of the hostfile's first node)")
    cmd = [*python_argv(python), "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}"]
    if include:
        cmd.append(f"--include={include}")
    if exclude:
        cmd.append(f"--exclude={exclude}")
    if num_nodes is not None:
        cmd.append(f"--num_nodes={_check_positive('--num-nodes', num_nodes)}")
    if num_gpus is not None:
        cmd.append(f"--num_gpus={_check_positive('--num-gpus', num_gpus)}")
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    if master_port is not None:
        cmd.append(f"--master_port={_port(master_port)}")
    cmd.append(f"--launcher={backend}")
    if backend_args:
        cmd.append(f"--launcher_args={backend_args}")
    if ssh_port is not None:
        cmd.append(f"--ssh_port={_port(ssh_port)}")
    if no_ssh:
        cmd += ["--no_ssh", f"--node_rank={node_rank}"]
    rank = [jobspec.MODULE, job_file] if job_file else ["vimoe_dist", *train_args(config, overrides)]
    return [*cmd, "--no_local_rank", "--module", *rank]


def _check_positive(flag: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{flag}={value} must be at least 1")
    return value


def _port(port: int) -> int:
    if not 0 < port < 65536:
        raise UserError(f"port {port} is not a TCP port (1-65535)")
    return port
