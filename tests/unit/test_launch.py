"""`vimoe launch local|hostfile`: the command lines it prints, the hostfile parser and the job file of a multi-node
launch. (The sbatch script: test_launch_sbatch.py; hostile values: test_launch_injection.py; signals:
test_launch_signals.py.)

The launchers themselves run for real in tests/system/test_launchers.py; here the printed command lines are fed to
the real argument parsers of torchrun and the deepspeed launcher.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import data_yaml, run_cli, unset_env

from vimoe_dist.errors import UserError
from vimoe_dist.launch import jobspec
from vimoe_dist.launch.cmdline import build_deepspeed_hostfile, build_deepspeed_local, build_torchrun
from vimoe_dist.launch.hostfile import parse_hostfile

PY = "/opt/py/bin/python"
PY_SELF = sys.executable
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\ntrain:\n  steps: 5\n{data_yaml(tmp_path / 'data')}")
    return path


# ---- command lines -------------------------------------------------------------------------------------------


def test_local_deepspeed_dry_run_prints_the_exact_command(config, capsys):
    code, out, _ = run_cli(
        ["launch", "local", "--nproc", "2", "--master-port", "29511", "--dry-run", "--python", PY,
         "--config", str(config), "train.steps=3"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert shlex.split(out) == [
        PY, "-m", "deepspeed.launcher.runner", "--num_gpus=2", "--master_addr=127.0.0.1", "--master_port=29511",
        "--no_local_rank", "--module", "vimoe_dist", "train", "--config", str(config), "train.steps=3",
    ]  # fmt: skip


def test_local_torchrun_dry_run(config, capsys):
    code, out, _ = run_cli(
        ["launch", "local", "--nproc", "4", "--launcher", "torchrun", "--max-restarts", "1", "--dry-run",
         "--python", PY, "--config", str(config)],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert shlex.split(out) == [
        "env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",  # a fresh rendezvous store for every restart round
        PY, "-m", "vimoe_dist.parallel.torchrun",
        "--nproc-per-node=4", "--nnodes=1", "--standalone", "--max-restarts=1",
        "-m", "vimoe_dist", "train", "--config", str(config),
    ]  # fmt: skip


def test_local_deepspeed_picks_a_free_port_rather_than_29500(config, capsys):
    _, out, _ = run_cli(["launch", "local", "--nproc", "2", "--dry-run", "--config", str(config)], capsys)
    port = int(next(a for a in shlex.split(out) if a.startswith("--master_port=")).split("=")[1])
    assert 0 < port < 65536


def test_bad_config_fails_before_launching(config, capsys):
    code, out, err = run_cli(
        ["launch", "local", "--nproc", "2", "--dry-run", "--config", str(config), "train.steps=ten"], capsys
    )
    assert code == 2 and out == "" and "train.steps" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, ranks",
    [
        (["local", "--nproc", "3"], "(--nproc 3)"),
        (["local", "--nproc", "3", "--launcher", "torchrun"], "(--nproc 3)"),
        (["slurm", "--nodes", "3"], "(--nodes 3 x 1 ranks per node)"),
        (["slurm", "--nodes", "1", "--ntasks-per-node", "3"], "(--nodes 1 x 3 ranks per node)"),
        (["hostfile", "--hostfile", "HOSTFILE", "--num-gpus", "3"], "(3 ranks: the slots of HOSTFILE)"),
    ],
)
def test_layouts_that_cannot_work_fail_before_any_rank_starts(config, tmp_path, capsys, argv, ranks):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=4\n")
    argv = [a.replace("HOSTFILE", str(hostfile)) for a in argv]
    ranks = ranks.replace("HOSTFILE", str(hostfile))
    code, out, err = run_cli(
        ["launch", *argv, "--dry-run", "--config", str(config), "parallel.ep_size=2", "train.global_batch_size=48"],
        capsys,
    )
    assert code == 2 and out == ""
    assert err == f"vimoe launch: error: parallel.ep_size: 2 does not divide the world size 3 {ranks}\n"


def test_max_restarts_needs_torchrun(config, capsys):
    code, _, err = run_cli(
        ["launch", "local", "--nproc", "2", "--max-restarts", "1", "--dry-run", "--config", str(config)], capsys
    )
    assert code == 2 and "--launcher torchrun" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(nproc=0), "--nproc=0"),
        (dict(nproc=2, max_restarts=-1), "--max-restarts=-1"),
        (dict(nproc=2, master_port=70000), "port 70000"),
    ],
)
def test_torchrun_bad_values(kwargs, message):
    nproc = kwargs.pop("nproc")
    with pytest.raises(UserError, match=message):
        build_torchrun(PY, nproc, "c.yaml", [], **kwargs)


def test_hostfile_command_with_a_job_file_hands_the_runner_no_user_argument():
    cmd = build_deepspeed_hostfile(PY, "hf", "c $(x).yaml", ["a={b,c}"], master_addr="n1", job_file="/r/job.json")
    assert cmd[-4:] == ["--no_local_rank", "--module", "vimoe_dist.launch.jobspec", "/r/job.json"]
    assert not any("$(x)" in a or "{b,c}" in a for a in cmd)


def test_hostfile_command_passes_everything_through(tmp_path):
    cmd = build_deepspeed_hostfile(
        PY, "hf", "c.yaml", ["a=1"], include="n1@n2:0,1", num_gpus=2, master_addr="n1", master_port=29600,
        backend="openmpi", backend_args="--mca btl tcp", ssh_port=2222, no_ssh=True, node_rank=1,
    )  # fmt: skip
    assert cmd == [
        PY, "-m", "deepspeed.launcher.runner", "--hostfile=hf", "--include=n1@n2:0,1", "--num_gpus=2",
        "--master_addr=n1", "--master_port=29600", "--launcher=openmpi", "--launcher_args=--mca btl tcp",
        "--ssh_port=2222", "--no_ssh", "--node_rank=1", "--no_local_rank", "--module", "vimoe_dist", "train",
        "--config", "c.yaml", "a=1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(include="a", exclude="b"), "mutually exclusive"),
        (dict(backend="ssh"), "--backend='ssh'"),
        (dict(no_ssh=True, master_addr="n1"), "--no-ssh needs --node-rank"),
        (dict(no_ssh=True, node_rank=0), "--no-ssh needs --master-addr"),
        (dict(node_rank=1), "only meaningful with --no-ssh"),
        (dict(num_nodes=0), "--num-nodes=0"),
        (dict(include="n1;touch x"), "--include"),
        (dict(exclude="-oProxyCommand=x"), "--exclude"),
        (dict(master_addr="n1 --x"), "--master-addr"),
        (dict(backend_args="--mca 'open"), "--backend-args"),
    ],
)
def test_hostfile_command_refuses_contradictions(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_deepspeed_hostfile(PY, "hf", "c.yaml", [], **kwargs)


def test_hostfile_cli_gives_variables_by_name_and_ranks_read_a_private_job_file(config, tmp_path, capsys, monkeypatch):
    """`--env NAME` and `--env NAME=VALUE`: the command line and the output name the variables and never show a
    value; over ssh the ranks' arguments and variables are in RUN/launch/job.json, mode 0600 in a 0700 directory."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode1 slots=2\n\nnode2 slots=2  # spare\n")
    monkeypatch.setenv("MY_TOKEN", "s3cret-token")
    env_args = ["--env", "MY_TOKEN", "--env", "NCCL_DEBUG=WARN-secret"]
    argv = ["launch", "hostfile", "--hostfile", str(hostfile), *env_args, "--config", str(config), "train.steps=3"]
    code, out, err = run_cli([*argv[:2], "--dry-run", *argv[2:]], capsys)
    assert code == 0 and "2 hosts, 4 slots" in err and "MY_TOKEN, NCCL_DEBUG" in err
    assert "s3cret" not in out + err and "WARN-secret" not in out + err
    job_file = tmp_path / "run" / "launch" / "job.json"
    cmd = shlex.split(out)
    assert cmd[0] == PY_SELF and cmd[-3:] == ["--module", "vimoe_dist.launch.jobspec", str(job_file)]
    assert not job_file.exists()  # a dry run writes nothing
    # for real, with a launcher that does nothing (/bin/true as the interpreter): the file is written
    code, out, err = run_cli([*argv[:2], "--python", "/bin/true", *argv[2:]], capsys)
    assert code == 0 and "s3cret" not in out + err
    assert stat.S_IMODE(job_file.stat().st_mode) == 0o600 and stat.S_IMODE(job_file.parent.stat().st_mode) == 0o700
    assert json.loads(job_file.read_text()) == {
        "argv": ["train", "--config", str(config), "train.steps=3"],
        "env": {"MY_TOKEN": "s3cret-token", "NCCL_DEBUG": "WARN-secret"},
    }
    # --no-ssh: this node's ranks inherit the variables; no file, nothing printed but the names
    code, out, err = run_cli(
        ["launch", "hostfile", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1", "--master-addr",
         "node1", *env_args, "--dry-run", "--config", str(config)],
        capsys,
    )  # fmt: skip
    cmd = shlex.split(out)
    assert cmd[0] == PY_SELF and "--no_ssh" in cmd and "--node_rank=1" in cmd and "--master_addr=node1" in cmd
    assert cmd[-5:] == ["--module", "vimoe_dist", "train", "--config", str(config)]
    assert "s3cret" not in out + err and "MY_TOKEN" in err


def test_job_file_round_trip_and_refusals(tmp_path):
    path = jobspec.job_file(tmp_path / "run")
    jobspec.write_job_file(path, ["train", "--config", "c.yaml", "k=$(v)"], {"A": "x\ny", "B": ""})
    assert jobspec.read_job_file(path) == (["train", "--config", "c.yaml", "k=$(v)"], {"A": "x\ny", "B": ""})
    os.chmod(path, 0o640)
    with pytest.raises(UserError, match="mode 0600; refusing"):
        jobspec.read_job_file(path)
    with pytest.raises(UserError, match="storage every node sees"):
        jobspec.read_job_file(tmp_path / "elsewhere" / "job.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"argv": "train", "env": {}}')
    os.chmod(bad, 0o600)
    with pytest.raises(UserError, match="'argv' is not a list"):
        jobspec.read_job_file(bad)


def test_job_file_entry_keeps_interpreter_flags_and_runs_vimoe(tmp_path):
    assert jobspec.rank_exec_argv(["train"], ["/py", "-u", "-m", jobspec.MODULE, "f"], "/py") == [
        "/py", "-u", "-m", "vimoe_dist", "train",
    ]  # fmt: skip
    path = jobspec.job_file(tmp_path)
    jobspec.write_job_file(path, ["--version"], {"VIMOE_JOB_CHECK": "1"})
    result = subprocess.run([sys.executable, "-m", jobspec.MODULE, str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("vimoe-dist "), result.stderr
    os.chmod(path, 0o644)
    result = subprocess.run([sys.executable, "-m", jobspec.MODULE, str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "refusing" in result.stderr


def test_hostfile_env_without_value_must_be_set(config, tmp_path, capsys, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\n")
    unset_env(monkeypatch, "VIMOE_UNSET_VAR")
    code, _, err = run_cli(
        ["launch", "hostfile", "--hostfile", str(hostfile), "--env", "VIMOE_UNSET_VAR", "--dry-run",
         "--config", str(config)],
        capsys,
    )  # fmt: skip
    assert code == 2 and "VIMOE_UNSET_VAR" in err


def test_hostfile_node_rank_beyond_the_file(config, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\n")
    code, _, err = run_cli(
        ["launch", "hostfile", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1", "--master-addr", "n",
         "--dry-run", "--config", str(config)],
        capsys,
    )  # fmt: skip
    assert code == 2 and "lists 1 hosts" in err


@pytest.mark.slow
def test_commands_parse_with_the_real_launchers():
    """The printed command lines are accepted by torchrun's and deepspeed's own argument parsers."""
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from torch.distributed.run import get_args_parser

    ds = build_deepspeed_local(PY, 2, "c.yaml", ["k=v"], master_port=29512)
    parsed = deepspeed_args(ds[3:])
    assert (parsed.num_gpus, parsed.master_port, parsed.module, parsed.user_script) == (2, 29512, True, "vimoe_dist")
    assert parsed.no_local_rank  # else `--local_rank=N` would land between `vimoe_dist` and `train`
    assert parsed.user_args == ["train", "--config", "c.yaml", "k=v"]
    hf = build_deepspeed_hostfile(PY, "hf", "c.yaml", [], exclude="n2:1", no_ssh=True, node_rank=0, master_addr="a")
    parsed = deepspeed_args(hf[3:])
    assert (parsed.hostfile, parsed.exclude, parsed.no_ssh, parsed.node_rank) == ("hf", "n2:1", True, 0)
    tr = build_torchrun(PY, 2, "c.yaml", ["k=v"], max_restarts=1)
    assert tr[:2] == ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]
    parsed = get_args_parser().parse_args(tr[5:])
    assert (parsed.nproc_per_node, parsed.standalone, parsed.max_restarts, parsed.module) == ("2", True, 1, True)
    assert (parsed.training_script, parsed.training_script_args) == (
        "vimoe_dist",
        ["train", "--config", "c.yaml", "k=v"],
    )


def test_launch_imports_nothing_heavy():
    code = (
        "import sys, vimoe_dist.cli as c; c.build_parser(); import vimoe_dist.launch.cli, vimoe_dist.launch.sbatch;"
        "heavy = [m for m in ('torch', 'deepspeed', 'numpy', 'webdataset') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- hostfiles -----------------------------------------------------------------------------------------------


def test_parse_hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# comment\nworker-0 slots=8\n  worker-1   slots=4 # half\n\n")
    assert parse_hostfile(path) == {"worker-0": 8, "worker-1": 4}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker-0 8\n", r":1: expected 'host slots=N'"),
        ("a slots=1\nb slots=x\n", r":2: expected"),
        ("a slots=0\n", "slots=0"),
        ("a slots=1\na slots=2\n", "listed twice"),
        ("-oProxyCommand=touch slots=1\n", "not a host name"),
        ("# nothing\n", "no 'host slots=N' lines"),
    ],
)
def test_bad_hostfiles(tmp_path, text, message):
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_hostfile(path)


def test_missing_hostfile(tmp_path):
    with pytest.raises(UserError, match="No such file"):
        parse_hostfile(tmp_path / "absent")


def test_shipped_hostfile_example_parses():
    hosts = parse_hostfile(REPO / "launcher" / "deepspeed" / "hostfile")
    assert len(hosts) >= 2 and all(slots >= 1 for slots in hosts.values())
