"""Environment resolution from hand-made environ dicts: launcher variables, then Slurm, then a single process.
The variable sets are the ones torchrun 2.x, deepspeed's launcher (`deepspeed/launcher/launch.py`) and srun really
set; `tests/system/test_slurm_cluster.py` checks the Slurm path inside a real srun step."""

from __future__ import annotations

import os
import socket

import pytest
from support import unset_env

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.env import DistEnv, export_env, resolve_env, slurm_master_port

TORCHRUN = {
    "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
}  # fmt: skip
DEEPSPEED = {
    "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_RANK": "1", "CROSS_SIZE": "2",
    "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
}  # fmt: skip
SRUN = {
    "SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}  # fmt: skip


def test_torchrun_variables():
    env = resolve_env(TORCHRUN)
    assert env == DistEnv(3, 4, 1, 2, 1, 2, "10.0.0.1", 29500, "torchrun")
    assert env.is_distributed and not env.is_main


def test_deepspeed_launcher_variables():
    assert resolve_env(DEEPSPEED) == DistEnv(2, 4, 0, 2, 1, 2, "node1", 29500, "deepspeed")


def test_hand_set_env_variables_assume_one_node():
    env = resolve_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.source, env.local_world_size, env.node_rank, env.num_nodes) == ("torchrun", 2, 0, 1)


def test_launcher_variables_win_over_slurm():
    # torchrun or deepspeed started by srun inside an allocation: the launcher's numbering is the real one
    assert resolve_env({**SRUN, **TORCHRUN}).source == "torchrun"


def test_slurm_step():
    env = resolve_env(SRUN)
    assert env == DistEnv(3, 4, 1, 2, 1, 2, "gpu07", slurm_master_port(12345), "slurm")


def test_slurm_uneven_tasks_per_node_and_step_nodelist():
    environ = {**SRUN, "SLURM_STEP_NODELIST": "b[3-4]", "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1",
               "SLURM_LOCALID": "0", "SLURM_PROCID": "3"}  # fmt: skip
    env = resolve_env(environ)
    assert (env.master_addr, env.local_world_size, env.local_rank) == ("b3", 1, 0)


def test_slurm_master_from_environment_wins():
    env = resolve_env({**SRUN, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 23456)


def test_slurm_master_port_is_stable_high_and_below_ephemeral_range():
    ports = {slurm_master_port(job) for job in range(0, 100_000, 7)}
    assert min(ports) >= 20000 and max(ports) < 32768
    assert slurm_master_port(987654) == slurm_master_port(987654)
    assert slurm_master_port(1) != slurm_master_port(2)


def test_batch_script_without_srun_is_a_single_process():
    # the batch step has SLURM_JOB_ID and SLURM_PROCID but no SLURM_STEP_ID
    environ = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert resolve_env(environ).source == "single"


def test_single_process_gets_a_free_port():
    env = resolve_env({})
    assert env == DistEnv(0, 1, 0, 1, 0, 1, "127.0.0.1", env.master_port, "single")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", env.master_port))  # still free


def test_single_process_honours_master_address():
    env = resolve_env({"MASTER_ADDR": "127.0.0.2", "MASTER_PORT": "29999"})
    assert (env.source, env.master_addr, env.master_port) == ("single", "127.0.0.2", 29999)


@pytest.mark.parametrize("drop", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_half_set_launcher_environment_names_the_missing_variable(drop):
    environ = {k: v for k, v in TORCHRUN.items() if k != drop}
    with pytest.raises(UserError, match=f"half-set.*{drop} missing"):
        resolve_env(environ)


def test_rank_without_world_size():
    with pytest.raises(UserError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        resolve_env({"RANK": "0"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"RANK": "4"}, r"RANK=4 is outside \[0, WORLD_SIZE=4\)"),
        ({"RANK": "-1"}, "RANK=-1 is outside"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"LOCAL_RANK": "2"}, r"LOCAL_RANK=2 is outside \[0, LOCAL_WORLD_SIZE=2\)"),
        ({"RANK": "three"}, "RANK='three' is not an integer"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({"GROUP_RANK": "2"}, r"GROUP_RANK=2 is outside \[0, GROUP_WORLD_SIZE=2\)"),
    ],
)
def test_bad_launcher_values(changes, message):
    with pytest.raises(UserError, match=message):
        resolve_env({**TORCHRUN, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is outside \[0, SLURM_NTASKS=4\)"),
        ({"SLURM_NTASKS": ""}, "without SLURM_NTASKS"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
        ({"SLURM_JOB_ID": "x"}, "SLURM_JOB_ID='x' is not an integer"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(y2)"}, "tasks-per-node"),
    ],
)
def test_bad_slurm_values(changes, message):
    with pytest.raises(UserError, match=message):
        resolve_env({**SRUN, **changes})


def test_export_env_round_trips_through_resolve():
    env = resolve_env(SRUN)
    environ: dict[str, str] = {}
    export_env(env, environ)
    assert set(environ) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    again = resolve_env(environ)
    assert (again.rank, again.world_size, again.local_rank, again.local_world_size) == (3, 4, 1, 2)
    assert (again.master_addr, again.master_port) == (env.master_addr, env.master_port)


def test_export_env_defaults_to_os_environ(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        unset_env(monkeypatch, name)
    export_env(DistEnv(0, 1, 0, 1, 0, 1, "127.0.0.1", 29400, "single"))
    assert os.environ["MASTER_PORT"] == "29400" and os.environ["WORLD_SIZE"] == "1"
