"""Where this process sits in the job: rank, world size, local rank, node and rendezvous address.

The launcher builds command lines; each rank resolves its own environment here (the dinov2
`distributed/__init__.py` idea), so one code path serves torchrun, the deepspeed launcher, `srun` and a plain
`python` run. In order:

1. **Launcher variables** (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), set by torchrun and by
   the deepspeed launcher (which also appends `--local_rank=N` to the command line; the variable carries the same
   value). All five must be set; a half-set environment is refused rather than guessed.
2. **Slurm task variables** when this process is a task of an `srun` step (`SLURM_STEP_ID` and `SLURM_PROCID` set):
   rank, size, local rank and node come from `SLURM_*`; `MASTER_ADDR` is the first host of the step's node list and
   `MASTER_PORT` is derived from the job id, so every task agrees without talking first. `MASTER_ADDR` /
   `MASTER_PORT` already in the environment win (an sbatch script may export them).
3. **A single process**: rank 0 of 1 on 127.0.0.1 with a free port.

A batch script itself (Slurm's `batch` step, no `srun`) is not a rank: it resolves as a single process, which is
what a plain `python` call inside `sbatch` means.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from vimoe_dist.errors import UserError
from vimoe_dist.launch.hostlist import expand_tasks_per_node, first_host
from vimoe_dist.launch.rendezvous import slurm_master_port
from vimoe_dist.net import free_port

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SOURCES = ("single", "torchrun", "deepspeed", "slurm")


@dataclass(frozen=True)
class DistEnv:
    """One rank's place in the job. `source` says which variables it came from (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    source: str

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Resolves this process's `DistEnv` from launcher variables, then Slurm, then a single-process default.

    Args:
        environ: the environment to read; `os.environ` when None.

    Raises:
        UserError: a half-set launcher environment, a non-integer variable, or a rank outside its size; the message
            names the variable.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCHER_VARS if environ.get(name, "") != ""]
    if any(name in present for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = [name for name in LAUNCHER_VARS if name not in present]
        if missing:
            raise UserError(
                f"half-set launcher environment: {', '.join(present)} set but {', '.join(missing)} missing "
                f"(torchrun and the deepspeed launcher set all of {', '.join(LAUNCHER_VARS)})"
            )
        env = _from_launcher(environ)
    elif environ.get("SLURM_STEP_ID", "") != "" and environ.get("SLURM_PROCID", "") != "":
        env = _from_slurm(environ)
    else:
        env = _single(environ)
    _validate(env)
    return env


def export_env(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Writes the variables torch.distributed's `env://` init and DeepSpeed read (`RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), so a Slurm or single-process run initializes
    exactly like a torchrun one.
    """
    environ = os.environ if environ is None else environ
    environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )


def _from_launcher(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "RANK")
    world_size = _int(environ, "WORLD_SIZE")
    # torchrun: LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE; deepspeed: LOCAL_SIZE, CROSS_RANK, CROSS_SIZE
    if "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ:
        source, local_size_var, node_var, nodes_var = "torchrun", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"
    elif "LOCAL_SIZE" in environ or "CROSS_RANK" in environ:
        source, local_size_var, node_var, nodes_var = "deepspeed", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"
    else:
        # hand-set env:// variables (e.g. a custom mpirun wrapper): torch's own convention, one node unless told
        source, local_size_var, node_var, nodes_var = "torchrun", "LOCAL_WORLD_SIZE", "NODE_RANK", "NUM_NODES"
    local_world_size = _int(environ, local_size_var) if environ.get(local_size_var) else world_size
    node_rank = _int(environ, node_var) if environ.get(node_var) else rank // local_world_size
    num_nodes = _int(environ, nodes_var) if environ.get(nodes_var) else -(-world_size // local_world_size)
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=_int(environ, "LOCAL_RANK"),
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=environ["MASTER_ADDR"],
        master_port=_int(environ, "MASTER_PORT"),
        source=source,
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    for name in ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID"):
        if environ.get(name, "") == "":
            raise UserError(f"Slurm step environment without {name} (SLURM_PROCID is set)")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("Slurm step environment without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
    node_rank = _int(environ, "SLURM_NODEID")
    tasks_var = "SLURM_STEP_TASKS_PER_NODE" if environ.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    if environ.get(tasks_var):
        tasks_per_node = expand_tasks_per_node(environ[tasks_var])
        if node_rank >= len(tasks_per_node):
            raise UserError(f"SLURM_NODEID={node_rank} but {tasks_var}={environ[tasks_var]!r} lists fewer nodes")
        local_world_size = tasks_per_node[node_rank]
    else:
        local_world_size = _int(environ, "SLURM_NTASKS")
    num_nodes_var = "SLURM_STEP_NUM_NODES" if environ.get("SLURM_STEP_NUM_NODES") else "SLURM_NNODES"
    num_nodes = _int(environ, num_nodes_var) if environ.get(num_nodes_var) else 1
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        world_size=_int(environ, "SLURM_NTASKS"),
        local_rank=_int(environ, "SLURM_LOCALID"),
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
        master_port=_int(environ, "MASTER_PORT")
        if environ.get("MASTER_PORT")
        else slurm_master_port(_int(environ, "SLURM_JOB_ID")),
        source="slurm",
    )


def _single(environ: Mapping[str, str]) -> DistEnv:
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        node_rank=0,
        num_nodes=1,
        master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else free_port("127.0.0.1"),
        source="single",
    )


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def _validate(env: DistEnv) -> None:
    var = _VARS[env.source]
    if env.world_size < 1:
        raise UserError(f"{var['world_size']}={env.world_size} must be at least 1")
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"{var['rank']}={env.rank} is outside [0, {var['world_size']}={env.world_size})")
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        raise UserError(f"{var['local_world_size']}={env.local_world_size} is outside [1, {env.world_size}]")
    if not 0 <= env.local_rank < env.local_world_size:
        raise UserError(
            f"{var['local_rank']}={env.local_rank} is outside [0, {var['local_world_size']}={env.local_world_size})"
        )
    if env.num_nodes < 1 or not 0 <= env.node_rank < env.num_nodes:
        raise UserError(f"{var['node_rank']}={env.node_rank} is outside [0, {var['num_nodes']}={env.num_nodes})")
    if not 0 < env.master_port < 65536:
        raise UserError(f"MASTER_PORT={env.master_port} is not a TCP port (1-65535)")
    if not env.master_addr:
        raise UserError("MASTER_ADDR is empty")


# the variable each field came from, for error messages
_FIELDS = ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "num_nodes")
_VARS = {
    "single": dict(zip(_FIELDS, _FIELDS)),
    "torchrun": dict(
        zip(_FIELDS, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"))
    ),
    "deepspeed": dict(zip(_FIELDS, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"))),
    "slurm": dict(
        zip(
            _FIELDS,
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE", "SLURM_NODEID", "SLURM_NNODES"),
        )
    ),
}
