"""`vimoe launch slurm`: the sbatch script it renders from the shipped template, the site options (cores, threads,
exclusive nodes, NCCL and the site's network variables, pyxis containers), the Prometheus targets link, and the
submission through sbatch.

Rendered scripts run under a real bash with fake `srun`, `scontrol`, `sinfo` and `sbatch` on PATH
(tests/launch_fakes.py: there is no Slurm on this machine); the same scripts run on a real Slurm cluster in
tests/system/test_slurm_*.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_fakes import calls, make_fake_bin, srun_env
from support import data_yaml, run_cli, unset_env

from vimoe_dist.errors import UserError
from vimoe_dist.launch.cmdline import train_argv
from vimoe_dist.launch.resources import load_template, template_names
from vimoe_dist.launch.sbatch import SlurmJob, parse_slurm_time, render_sbatch
from vimoe_dist.launch.submit import parse_job_id

PY = "/opt/py/bin/python"
REPO = Path(__file__).resolve().parents[2]
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS": "1"}


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"run:\n  out_dir: {tmp_path / 'run'}\ntrain:\n  steps: 5\n{data_yaml(tmp_path / 'data')}  num_workers: 6\n"
    )
    return path


def render(**kwargs) -> str:
    job = SlurmJob(command=train_argv(PY, "/c fg/x.yaml", ["train.steps=9"]), **kwargs)
    return render_sbatch(job, load_template())


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_line(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if x.startswith("srun "))
    return shlex.split(line.removesuffix(" &"))


def run_script(script: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs `script` under bash with the fake Slurm tools; returns the result and the fakes' root."""
    root = tmp_path / "fakes"
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    full_env = {**os.environ, **make_fake_bin(root), **SLURM_ENV, **env}
    result = subprocess.run(["bash", str(path)], env=full_env, capture_output=True, text=True, timeout=60)
    return result, root


# ---- the script --------------------------------------------------------------------------------------------


def test_sbatch_gpu_job_has_one_task_per_gpu_and_requeues_on_signal():
    script = render(nodes=2, gpus_per_node=8, partition="gpu", time="4:00:00", signal_grace=300, log_dir="/l")
    d = directives(script)
    assert "--nodes=2" in d and "--ntasks-per-node=8" in d and "--gpus-per-node=8" in d
    assert "--partition=gpu" in d and "--time=4:00:00" in d
    assert "--signal=USR1@300" in d and "--requeue" in d and "--output=/l/%x-%j.out" in d
    assert srun_line(script) == [
        "srun", "--export=ALL", "--kill-on-bad-exit=0", "--wait=60", PY, "-m", "vimoe_dist", "train",
        "--config", "/c fg/x.yaml", "train.steps=9",
    ]  # fmt: skip
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "{{" not in script


def test_sbatch_cpu_job_defaults_to_one_task_per_node_and_ntasks_overrides():
    assert "--ntasks-per-node=1" in directives(render(nodes=2))
    d = directives(render(nodes=1, ntasks_per_node=2, cpus_per_task=1))
    assert "--ntasks-per-node=2" in d and not any(x.startswith("--gpus") for x in d)


def test_sbatch_extra_options_environment_and_no_requeue():
    script = render(extra_sbatch=["mail-type=END", "hint=nomultithread"], env=["A=WARN", "X=a b"], requeue=False)
    d = directives(script)
    assert "--mail-type=END" in d and "--hint=nomultithread" in d and "--no-requeue" in d
    assert not any(x.startswith("--signal") for x in d)
    assert "export A=WARN" in script and "export X='a b'" in script and "requeue=no" in script


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
        (dict(partition="gpu part"), "--partition"),
        (dict(account="a;b"), "--account"),
        (dict(qos="q\nx"), "control character"),
        (dict(mem="64 GB"), "--mem"),
        (dict(constraint="a b"), "--constraint"),
        (dict(cpus_per_task=0), "--cpus-per-task=0"),
        (dict(container_opts=["container-writable"]), "needs --container-image"),
        (dict(container_image="img", container_opts=["container-fly"]), "not a pyxis option"),
        (dict(container_image="img", container_opts=["container-mounts"]), "needs a value"),
        (dict(container_image="img", container_opts=["container-writable=1"]), "takes no value"),
        (dict(container_image="img", workdir="/a,b"), "container-mounts=SRC:DST"),
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


def test_plain_sbatch_example_is_valid_bash():
    example = REPO / "launcher" / "slurm" / "example.sbatch"
    subprocess.run(["bash", "-n", str(example)], check=True)
    text = example.read_text()
    assert "#SBATCH --signal=USR1@" in text and "scontrol requeue" in text and "srun" in text


def test_apptainer_python_and_extra_srun_args():
    job = SlurmJob(
        command=train_argv("apptainer exec --nv '/img s/v.sif' python", "c.yaml", []), srun_args=["--mpi=pmix"]
    )
    assert srun_line(render_sbatch(job, load_template())) == [
        "srun", "--export=ALL", "--kill-on-bad-exit=0", "--wait=60", "--mpi=pmix",
        "apptainer", "exec", "--nv", "/img s/v.sif", "python", "-m", "vimoe_dist", "train", "--config", "c.yaml",
    ]  # fmt: skip
    with pytest.raises(UserError, match="--srun-arg"):
        render_sbatch(SlurmJob(command=["x"], srun_args=["container"]), load_template())
    with pytest.raises(UserError, match="--python"):
        train_argv("python 'unclosed", "c.yaml", [])


# ---- site options ------------------------------------------------------------------------------------------


def test_cores_default_to_the_loader_workers_plus_two_and_omp_gets_the_rest(config, capsys):
    code, out, _ = run_cli(["launch", "slurm", "--gpus-per-node", "8", "--exclusive", "--config", str(config)], capsys)
    assert code == 0
    d = directives(out)
    assert "--cpus-per-task=8" in d and "--exclusive" in d  # data.num_workers 6 + 2
    assert "export OMP_NUM_THREADS=2" in out and "--cpus-per-task=8" in srun_line(out)
    code, out, _ = run_cli(["launch", "slurm", "--cpus-per-task", "16", "--config", str(config)], capsys)
    assert code == 0 and "--cpus-per-task=16" in directives(out) and "export OMP_NUM_THREADS=10" in out


def test_more_cores_than_a_node_has_is_one_line_where_sinfo_knows(config, tmp_path, capsys, monkeypatch):
    for key, value in make_fake_bin(tmp_path / "fakes").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FAKE_SINFO", "gpu* 64\ngpu* 64+\nbig 256")
    argv = ["launch", "slurm", "--gpus-per-node", "8", "--config", str(config)]
    code, out, err = run_cli(argv, capsys)  # 8 tasks x 8 cores = 64: fits
    assert code == 0, err
    code, out, err = run_cli([*argv, "--cpus-per-task", "9"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "72 cores, but the largest node of the default partition has 64 (sinfo)" in err
    monkeypatch.setenv("FAKE_SINFO", "")  # sinfo knows nothing: nothing to check
    code, _, _ = run_cli([*argv, "--cpus-per-task", "9"], capsys)
    assert code == 0
    assert ["--noheader", "--Node", "--format=%P %c"] in calls(tmp_path / "fakes", "sinfo")


def test_nccl_warn_by_default_and_the_sites_network_variables_reach_the_ranks(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0:1,mlx5_1:1")
    monkeypatch.setenv("FI_PROVIDER", "efa")
    monkeypatch.setenv("UCX_TLS", "rc x")
    unset_env(monkeypatch, "NCCL_DEBUG")
    code, script, _ = run_cli(["launch", "slurm", "--config", str(config)], capsys)
    assert code == 0
    # the job's environment lacks them (sbatch --export=NONE): the script's copies reach srun
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "FI_", "UCX_"))}
    root = tmp_path / "fakes"
    subprocess.run(["bash", "-c", script], env={**clean, **make_fake_bin(root), **SLURM_ENV}, check=True, timeout=60)
    ranks = srun_env(root)
    assert ranks["NCCL_DEBUG"] == "WARN" and ranks["NCCL_IB_HCA"] == "mlx5_0:1,mlx5_1:1"
    assert ranks["FI_PROVIDER"] == "efa" and ranks["UCX_TLS"] == "rc x"
    assert ranks["OMP_NUM_THREADS"] == "2" and ranks["MASTER_ADDR"] == "node1"
    # the job's environment has its own (the compute nodes' site settings): they win
    site = {**clean, "NCCL_IB_HCA": "mlx5_2", "NCCL_DEBUG": "INFO"}
    subprocess.run(["bash", "-c", script], env={**site, **make_fake_bin(root), **SLURM_ENV}, check=True, timeout=60)
    ranks = srun_env(root)
    assert ranks["NCCL_IB_HCA"] == "mlx5_2" and ranks["NCCL_DEBUG"] == "INFO"


def test_env_by_name_writes_no_value_into_the_script(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cret")
    code, script, err = run_cli(["launch", "slurm", "--env", "WANDB_API_KEY", "--config", str(config)], capsys)
    assert code == 0 and "s3cret" not in script + err and "export WANDB_API_KEY\n" not in script
    result, root = run_script(script, tmp_path, WANDB_API_KEY="from-the-job")
    assert result.returncode == 0 and srun_env(root)["WANDB_API_KEY"] == "from-the-job"
    monkeypatch.delenv("WANDB_API_KEY")
    code, _, err = run_cli(["launch", "slurm", "--env", "WANDB_API_KEY", "--config", str(config)], capsys)
    assert code == 2 and "WANDB_API_KEY: not set" in err


def test_pyxis_container_mounts_the_job_directory_and_checks_its_options(config, tmp_path, capsys):
    image = "nvcr.io#org/vimoe:24.01"
    argv = ["launch", "slurm", "--container-image", image, "--container-opt", "container-writable"]
    code, out, _ = run_cli([*argv, "--config", str(config)], capsys)
    assert code == 0
    srun = srun_line(out)
    assert srun[4:9] == [
        "--cpus-per-task=8", f"--container-image={image}", f"--container-mounts={tmp_path}:{tmp_path}",
        f"--container-workdir={tmp_path}", "--container-writable",
    ]  # fmt: skip
    assert srun[9:12] == ["python", "-m", "vimoe_dist"]  # the image's interpreter, not this machine's
    code, out, _ = run_cli([*argv, "--container-opt", "container-mounts=/data:/data", "--config", str(config)], capsys)
    assert "--container-mounts=/data:/data" in srun_line(out) and f"--container-mounts={tmp_path}:{tmp_path}" not in out
    code, out, err = run_cli([*argv, "--container-opt", "container-gpus=8", "--config", str(config)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "not a pyxis option" in err


# ---- templates shipped in the package ----------------------------------------------------------------------


def test_templates_are_named_or_given_as_files(config, tmp_path, capsys):
    assert "vimoe" in template_names()
    code, out, _ = run_cli(["launch", "slurm", "--template", "vimoe", "--config", str(config)], capsys)
    assert code == 0 and out.startswith("#!/bin/bash")
    own = tmp_path / "mine.tmpl"
    own.write_text("#!/bin/bash\n{{directives}}\n{{command}}\n")
    code, out, _ = run_cli(["launch", "slurm", "--template", str(own), "--config", str(config)], capsys)
    assert code == 0 and out.splitlines()[1].startswith("#SBATCH --job-name=")
    for bad in ("vimoe-array", "nowhere/x.tmpl"):
        code, out, err = run_cli(["launch", "slurm", "--template", bad, "--config", str(config)], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and bad in err


def test_a_copy_of_the_package_outside_the_checkout_renders_and_writes_its_files(tmp_path):
    """The templates and monitoring files are read through importlib.resources from the package itself (as from an
    installed wheel), not from launcher/ of a checkout: a copy of vimoe_dist alone, run elsewhere, has them."""
    shutil.copytree(REPO / "vimoe_dist", tmp_path / "site" / "vimoe_dist", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.yaml").write_text(f"train:\n  steps: 5\n{data_yaml(tmp_path / 'data')}")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    assert run("-c", "import vimoe_dist; print(vimoe_dist.__file__)").stdout.startswith(str(tmp_path / "site"))
    result = run("-m", "vimoe_dist", "launch", "slurm", "--print", "--config", "c.yaml")
    assert result.returncode == 0 and result.stdout.startswith("#!/bin/bash"), result.stderr
    result = run("-m", "vimoe_dist", "launch", "monitoring", "--out", "mon")
    assert result.returncode == 0 and (elsewhere / "mon" / "alerts.yml").is_file(), result.stderr


# ---- the Prometheus targets link ---------------------------------------------------------------------------


def prometheus_job(tmp_path: Path) -> tuple[str, Path, Path]:
    run_dir, sd_dir = tmp_path / "run", tmp_path / "sd"
    run_dir.mkdir()
    sd_dir.mkdir()
    (run_dir / "prometheus_targets.json").write_text("[] # an earlier job's, naming hosts that are gone\n")
    os.utime(run_dir / "prometheus_targets.json", (1, 1))
    script = render(run_dir=str(run_dir), prometheus_sd_dir=str(sd_dir))
    return script, run_dir, sd_dir


@pytest.mark.slow
def test_the_job_links_this_runs_targets_for_prometheus_and_unlinks_them_at_the_end(tmp_path):
    script, run_dir, sd_dir = prometheus_job(tmp_path)
    link = sd_dir / "4242.json"
    # rank 0 (here: the fake srun) writes the targets file; the link must appear while the job runs
    hook = (
        f'sleep 1; [ ! -e {link} ] || exit 9; echo \'[{{"targets": ["node1:9500"]}}]\' > {run_dir}/t.json; '
        f"mv {run_dir}/t.json {run_dir}/prometheus_targets.json; "
        f"for i in $(seq 100); do [ -L {link} ] && exit 0; sleep 0.2; done; exit 8"
    )
    result, _ = run_script(script, tmp_path, FAKE_SRUN_HOOK=hook)
    assert result.returncode == 0, result.stdout + result.stderr  # 9: linked a stale file; 8: never linked
    assert "Prometheus targets linked at" in result.stdout
    assert not link.exists() and not link.is_symlink()  # gone when the job ended


@pytest.mark.slow
def test_scancel_removes_the_link_at_once(tmp_path):
    script, run_dir, sd_dir = prometheus_job(tmp_path)
    link = sd_dir / "4242.json"
    (tmp_path / "job.sbatch").write_text(script)
    env = {**os.environ, **make_fake_bin(tmp_path / "fakes"), **SLURM_ENV}
    pid_file = tmp_path / "srun.pid"
    hook = (
        f"echo $$ > {pid_file}; echo '[]' > {run_dir}/t.json; mv {run_dir}/t.json {run_dir}/prometheus_targets.json; "
        "exec sleep 600"
    )
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env={**env, "FAKE_SRUN_HOOK": hook})
    try:
        deadline = time.monotonic() + 30
        while not link.is_symlink():
            assert time.monotonic() < deadline and proc.poll() is None, "the link never appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what scancel sends the batch shell
        assert proc.wait(timeout=10) == 143
    finally:
        proc.kill()
        if pid_file.exists():  # the fake srun, left to Slurm in a real job
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert not link.is_symlink()


def test_prometheus_sd_dir_needs_metrics(config, capsys):
    argv = ["launch", "slurm", "--prometheus-sd-dir", "/sd", "--config", str(config)]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and "metrics.port is 0" in err
    code, out, err = run_cli([*argv, "metrics.port=9500"], capsys)
    assert code == 0 and "prometheus_sd_dir=/sd" in out and "metrics.addr=127.0.0.1" in err


# ---- submission ----------------------------------------------------------------------------------------------


def test_submit_writes_a_private_script_and_reads_the_job_id(config, tmp_path, capsys, monkeypatch):
    for key, value in make_fake_bin(tmp_path / "fakes").items():
        monkeypatch.setenv(key, value)
    code, out, _ = run_cli(["launch", "slurm", "--submit", "--env", "K=s3cret", "--config", str(config)], capsys)
    assert code == 0 and "submitted job 4242: script " in out and "vimoe-tiny-4242.out" in out
    (argv,) = calls(tmp_path / "fakes", "sbatch")
    script = Path(argv[-1])
    assert argv[:-1] == ["--parsable"] and stat.S_IMODE(script.stat().st_mode) == 0o600
    monkeypatch.setenv("FAKE_SBATCH_OUT", "sbatch: error: Batch job submission failed")
    code, out, err = run_cli(["launch", "slurm", "--submit", "--config", str(config)], capsys)
    assert code == 2 and err.count("\n") == 1 and "sbatch printed no job id" in err
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out, err = run_cli(["launch", "slurm", "--submit", "--config", str(config)], capsys)
    assert code == 2 and "sbatch not found" in err


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_the_job_is_one_line_and_leaves_the_job(config, tmp_path):
    env = {**os.environ, **make_fake_bin(tmp_path / "fakes"), "FAKE_SBATCH_SLEEP": "60", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "vimoe_dist", "launch", "slurm", "--submit", "--wait", "--config", str(config)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("sbatch --parsable --wait ")
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "vimoe: stopped waiting for sbatch: job 4242 keeps running (scancel 4242 stops it)\n"


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


@pytest.mark.parametrize(("stdout", "job_id"), [("4242\n", 4242), ("17;cluster-a\n", 17), ("\n 9 \n", 9)])
def test_parse_job_id(stdout, job_id):
    assert parse_job_id(stdout) == job_id


def test_parse_job_id_refuses_other_output():
    with pytest.raises(UserError, match="no job id"):
        parse_job_id("Submitted batch job 12\n")  # without --parsable
