"""`vimoe launch`: the command lines it prints, the hostfile parser and the sbatch script it renders.

The launchers themselves run for real in tests/system/test_launchers.py and the sbatch script on a real Slurm
cluster in tests/system/test_slurm_*.py; here the printed command lines are fed to the real argument parsers of
torchrun and the deepspeed launcher, and the rendered script to `bash -n`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vimoe_dist.cli import main
from vimoe_dist.errors import UserError
from vimoe_dist.launch.cmdline import build_deepspeed_hostfile, build_deepspeed_local, build_torchrun, train_argv
from vimoe_dist.launch.hostfile import parse_hostfile
from vimoe_dist.launch.sbatch import SlurmJob, default_template, parse_slurm_time, render_sbatch

PY = "/opt/py/bin/python"
PY_SELF = sys.executable
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\ntrain:\n  steps: 5\n")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


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
        PY, "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=1", "--standalone", "--max-restarts=1",
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
    ],
)
def test_hostfile_command_refuses_contradictions(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_deepspeed_hostfile(PY, "hf", "c.yaml", [], **kwargs)


def test_hostfile_cli_with_forwarded_environment(config, tmp_path, capsys, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode1 slots=2\n\nnode2 slots=2  # spare\n")
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5")
    env_args = ["--env", "NCCL_IB_HCA", "--env", "NCCL_DEBUG=WARN"]
    code, out, err = run_cli(
        ["launch", "hostfile", "--hostfile", str(hostfile), *env_args, "--dry-run", "--config", str(config)], capsys
    )
    assert code == 0 and "2 hosts, 4 slots" in err
    env_file = tmp_path / "run" / "launch" / "deepspeed_env"
    assert shlex.split(out)[:5] == ["env", "NCCL_IB_HCA=mlx5", "NCCL_DEBUG=WARN", f"DS_ENV_FILE={env_file}", PY_SELF]
    assert not env_file.exists()  # dry run writes nothing
    # --no-ssh: this node's ranks inherit the variables, no file for remote ranks
    code, out, _ = run_cli(
        ["launch", "hostfile", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1", "--master-addr",
         "node1", *env_args, "--dry-run", "--config", str(config)],
        capsys,
    )  # fmt: skip
    argv = shlex.split(out)
    assert argv[:4] == ["env", "NCCL_IB_HCA=mlx5", "NCCL_DEBUG=WARN", PY_SELF]
    assert "--no_ssh" in argv and "--node_rank=1" in argv and "--master_addr=node1" in argv


def test_hostfile_env_without_value_must_be_set(config, tmp_path, capsys, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\n")
    monkeypatch.delenv("VIMOE_UNSET_VAR", raising=False)
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


# ---- sbatch --------------------------------------------------------------------------------------------------


def render(**kwargs) -> str:
    job = SlurmJob(command=train_argv(PY, "/c fg/x.yaml", ["train.steps=9"]), **kwargs)
    return render_sbatch(job, default_template().read_text())


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_sbatch_gpu_job_has_one_task_per_gpu_and_requeues_on_signal():
    script = render(nodes=2, gpus_per_node=8, partition="gpu", time="4:00:00", signal_grace=300, log_dir="/l")
    d = directives(script)
    assert "--nodes=2" in d and "--ntasks-per-node=8" in d and "--gpus-per-node=8" in d
    assert "--partition=gpu" in d and "--time=4:00:00" in d
    assert "--signal=USR1@300" in d and "--requeue" in d and "--output=/l/%x-%j.out" in d
    srun = "srun --kill-on-bad-exit=0 --wait=60 /opt/py/bin/python -m vimoe_dist train"
    assert f"{srun} --config '/c fg/x.yaml' train.steps=9" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "{{" not in script


def test_sbatch_cpu_job_defaults_to_one_task_per_node_and_ntasks_overrides():
    assert "--ntasks-per-node=1" in directives(render(nodes=2))
    d = directives(render(nodes=1, ntasks_per_node=2, cpus_per_task=1))
    assert "--ntasks-per-node=2" in d and not any(x.startswith("--gpus") for x in d)


def test_sbatch_extra_options_environment_and_no_requeue():
    script = render(extra_sbatch=["exclusive", "mail-type=END"], env=["NCCL_DEBUG=WARN", "X=a b"], requeue=False)
    d = directives(script)
    assert "--exclusive" in d and "--mail-type=END" in d and "--no-requeue" in d
    assert not any(x.startswith("--signal") for x in d)
    assert "export NCCL_DEBUG=WARN" in script and "export X='a b'" in script and "requeue=no" in script


def test_sbatch_cpus_per_task_reaches_srun_and_omp():
    script = render(cpus_per_task=6)
    assert "srun --kill-on-bad-exit=0 --wait=60 --cpus-per-task=6 " in script and "export OMP_NUM_THREADS=6" in script


def test_rendered_scripts_are_valid_bash(tmp_path):
    for kwargs in ({}, dict(nodes=4, gpus_per_node=8, time="1-00:00", env=["A=1"], cpus_per_task=8)):
        path = tmp_path / "job.sbatch"
        path.write_text(render(**kwargs))
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_sbatch_port_matches_the_ranks_derivation(tmp_path):
    """The template's shell arithmetic and `slurm_master_port` give the same port."""
    from vimoe_dist.launch.rendezvous import slurm_master_port

    line = next(x for x in render().splitlines() if x.startswith("export MASTER_PORT="))
    for job_id in (1, 11999, 12000, 987654):
        out = subprocess.run(
            ["bash", "-c", f"SLURM_JOB_ID={job_id}; {line}; echo $MASTER_PORT"], capture_output=True, text=True
        ).stdout
        assert int(out) == slurm_master_port(job_id)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(nodes=0), "--nodes=0"),
        (dict(ntasks_per_node=0), "--ntasks-per-node=0"),
        (dict(time="2", signal_grace=120), "not longer than --signal-grace"),
        (dict(time="1:2:3:4"), "--time="),
        (dict(env=["1X=2"]), "NAME=VALUE"),
        (dict(extra_sbatch=["--mem=1G"]), "without dashes"),
        (dict(job_name="a b"), "--job-name"),
        (dict(signal_grace=70000), "--signal-grace"),
    ],
)
def test_sbatch_refuses_impossible_jobs(kwargs, message):
    with pytest.raises(UserError, match=message):
        render(**kwargs)


def test_unknown_template_placeholder():
    with pytest.raises(UserError, match="unknown placeholder"):
        render_sbatch(SlurmJob(command=["x"]), "#!/bin/bash\n{{ nope }}\n")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30", 1800), ("30:15", 1815), ("1:00:00", 3600), ("2-0", 172800), ("1-02:03", 93780), ("0-0:0:5", 5)],
)
def test_parse_slurm_time(value, seconds):
    assert parse_slurm_time(value) == seconds


def test_slurm_print_and_submit_dry_run_write_nothing(config, tmp_path, capsys):
    code, out, _ = run_cli(
        ["launch", "slurm", "--nodes", "1", "--ntasks-per-node", "2", "--config", str(config)], capsys
    )
    assert code == 0 and out.startswith("#!/bin/bash") and "--job-name=vimoe-tiny" in out
    assert f"--output={tmp_path / 'run' / 'slurm'}/%x-%j.out" in out
    code, out, _ = run_cli(["launch", "slurm", "--submit", "--dry-run", "--config", str(config)], capsys)
    last = shlex.split(out.strip().splitlines()[-1])
    assert code == 0 and last[:2] == ["sbatch", "--parsable"] and last[-1].endswith(".sbatch")
    assert not (tmp_path / "run").exists()


def test_plain_sbatch_example_is_valid_bash():
    example = REPO / "launcher" / "slurm" / "example.sbatch"
    subprocess.run(["bash", "-n", str(example)], check=True)
    text = example.read_text()
    assert "#SBATCH --signal=USR1@" in text and "scontrol requeue" in text and "srun" in text


def test_container_python_and_srun_args_for_pyxis_and_apptainer():
    job = SlurmJob(
        command=train_argv("apptainer exec --nv '/img s/v.sif' python", "c.yaml", []),
        srun_args=["--container-image=reg#vimoe:1", "--container-mounts=/data:/data"],
    )
    script = render_sbatch(job, default_template().read_text())
    line = next(x for x in script.splitlines() if x.startswith("srun "))
    assert shlex.split(line) == [
        "srun", "--kill-on-bad-exit=0", "--wait=60", "--container-image=reg#vimoe:1", "--container-mounts=/data:/data",
        "apptainer", "exec", "--nv", "/img s/v.sif", "python", "-m", "vimoe_dist", "train", "--config", "c.yaml",
    ]  # fmt: skip
    with pytest.raises(UserError, match="--srun-arg"):
        render_sbatch(SlurmJob(command=["x"], srun_args=["container"]), default_template().read_text())
    with pytest.raises(UserError, match="--python"):
        train_argv("python 'unclosed", "c.yaml", [])
