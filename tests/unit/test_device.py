"""`run.device`: what asks for GPUs, the device a rank gets, the backend and precision that go with it, and the
one-line refusals before any rank starts (the trainer, `vimoe launch local|slurm`, `vimoe eval`, `analyze
routing`, `prune`).

This machine has no GPU (CI neither): the refusals are real here. The cases that need CUDA to succeed are marked
and skipped here; where a CUDA count must be faked (`torch.cuda.device_count`), the test says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import data_yaml, unset_env
from support import run_cli as run

from vimoe_dist.config import ConfigError, load_config
from vimoe_dist.errors import UserError
from vimoe_dist.launch.sbatch import SlurmJob, render_sbatch
from vimoe_dist.parallel import device as devices
from vimoe_dist.parallel.device import gpu_request, resolve_device, select_accelerator
from vimoe_dist.parallel.init import resolve_backend
from vimoe_dist.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
NO_DRIVER = ("/nonexistent/driver/nvidia",)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


@pytest.mark.parametrize(
    ("environ", "asked"),
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),  # Slurm's word for a job without GPUs
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),  # GPU 0, not zero GPUs
        ({"CUDA_VISIBLE_DEVICES": "GPU-5f2c"}, "CUDA_VISIBLE_DEVICES=GPU-5f2c"),
        # the deepspeed launcher writes CUDA_VISIBLE_DEVICES=0,1 for its ranks on a CPU-only machine too
        ({"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_SIZE": "2", "CROSS_RANK": "0"}, None),
        ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),  # an index list: GPU 0
        ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "gpu:0"}, None),  # counts of zero
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4"}, "SLURM_GPUS_PER_NODE=gpu:a100:4"),
        ({"VIMOE_GPUS_PER_NODE": "8", "LOCAL_SIZE": "8"}, "VIMOE_GPUS_PER_NODE=8"),
    ],
)
def test_what_asks_for_gpus(environ, asked):
    assert gpu_request(environ, NO_DRIVER) == asked


def test_an_nvidia_driver_asks_for_gpus(tmp_path):
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    assert gpu_request({}, (str(gpus),)) is None  # the driver's folder lists no GPU
    (gpus / "0000:17:00.0").mkdir()
    assert gpu_request({}, (str(gpus),)) == f"an NVIDIA driver ({gpus})"


@cpu_only
def test_without_cuda_cpu_and_plain_auto_run_on_the_cpu_and_a_gpu_request_is_refused():
    assert resolve_device("cpu", environ={"CUDA_VISIBLE_DEVICES": "0"}, driver_files=NO_DRIVER).type == "cpu"
    assert resolve_device("auto", environ={}, driver_files=NO_DRIVER).type == "cpu"
    with pytest.raises(UserError, match=r"^run\.device: auto: SLURM_JOB_GPUS=0,1 asks for GPUs, but CUDA is not us"):
        resolve_device("auto", environ={"SLURM_JOB_GPUS": "0,1"}, driver_files=NO_DRIVER)
    with pytest.raises(UserError, match=r"^run\.device: cuda, but CUDA is not usable here: .*run\.device=cpu"):
        resolve_device("cuda", environ={}, driver_files=NO_DRIVER)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_with_cuda_auto_and_cuda_take_the_local_ranks_gpu():
    assert resolve_device("auto", 0) == torch.device("cuda", 0)
    assert resolve_device("cuda", torch.cuda.device_count() - 1).index == torch.cuda.device_count() - 1
    assert resolve_device("cpu", 0).type == "cpu"


def test_more_local_ranks_than_gpus(monkeypatch):
    # faked CUDA: this machine has no GPU to count
    monkeypatch.setattr(devices, "cuda_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda", 0) == torch.device("cuda", 0)
    assert resolve_device("auto", 3, one_gpu_per_task=True) == torch.device("cuda", 0)  # Slurm bound one GPU
    with pytest.raises(UserError, match=r"local rank 1 needs GPU 1, but 1 CUDA device\(s\) are visible"):
        resolve_device("auto", 1)


def test_backend_follows_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend("auto", cpu) == "gloo" and resolve_backend("auto", gpu) == "nccl"
    assert resolve_backend("gloo", cpu) == "gloo" and resolve_backend("nccl", gpu) == "nccl"
    with pytest.raises(ConfigError, match=r"^parallel\.backend: nccl needs CUDA, but the ranks run on the cpu"):
        resolve_backend("nccl", cpu)
    with pytest.raises(ConfigError, match=r"^parallel\.backend: gloo has no all-to-all for CUDA tensors"):
        resolve_backend("gloo", gpu)


def test_deepspeed_is_told_the_device_before_it_is_imported():
    environ = {}
    select_accelerator("auto", environ)
    assert environ == {}  # DeepSpeed's own choice is ours
    select_accelerator("cpu", environ)
    assert environ == {"DS_ACCELERATOR": "cpu"}


def test_the_sbatch_script_marks_a_gpu_job():
    gpu = render_sbatch(SlurmJob(command=["python"], gpus_per_node=4), "{{environment}}")
    cpu = render_sbatch(SlurmJob(command=["python"], gpus_per_node=0), "{{environment}}")
    assert "export VIMOE_GPUS_PER_NODE=4" in gpu.splitlines() and "VIMOE_GPUS_PER_NODE" not in cpu


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n{data_yaml(tmp_path / 'data')}")
    return path


def test_a_slurm_job_without_gpus_cannot_need_them(config):
    cfg = load_config(config, ["run.device=cuda"])
    with pytest.raises(ConfigError, match=r"^run\.device: cuda needs GPUs, but --gpus-per-node 0 gives the job none"):
        preflight(cfg, 1, gpus_per_node=0)
    preflight(cfg, 8, gpus_per_node=8)  # the GPUs are on the nodes, not here
    with pytest.raises(ConfigError, match=r"^parallel\.precision: fp16 needs GPUs"):
        preflight(load_config(config, ["parallel.precision=fp16"]), 1, gpus_per_node=0)
    with pytest.raises(ConfigError, match=r"^parallel\.precision: fp16 needs a CUDA device \(run\.device: cpu\)"):
        preflight(load_config(config, ["parallel.precision=fp16", "run.device=cpu"]), 1)


@pytest.fixture
def environ(monkeypatch):
    """Variables a test sets, and DS_ACCELERATOR (which `vimoe train` sets from run.device), restored after it."""
    unset_env(monkeypatch, "DS_ACCELERATOR")
    return monkeypatch


@cpu_only
@pytest.mark.parametrize(
    ("argv", "variables", "needle"),
    [
        (["launch", "local", "--nproc", "2", "--dry-run"], {}, "run.device: cuda, but CUDA is not usable here"),
        (["launch", "slurm", "--nodes", "1", "--gpus-per-node", "0"], {}, "run.device: cuda needs GPUs, but --gpus"),
        (["train"], {}, "run.device: cuda, but CUDA is not usable here"),
        (["train"], {"SLURM_JOB_GPUS": "0"}, "run.device: auto: SLURM_JOB_GPUS=0 asks for GPUs"),
        (["eval", "--checkpoint", "/nonexistent"], {}, "run.device: cuda, but CUDA is not usable here"),
        (["analyze", "routing", "--checkpoint", "{tmp}", "--out", "{tmp}/a"], {}, "run.device: cuda, but CUDA is not"),
        (["prune", "--checkpoint", "{tmp}", "--keep-layers", "none", "--out", "{tmp}/p"], {}, "run.device: cuda, but"),
    ],
)
def test_refused_in_one_line_before_any_rank_starts(config, tmp_path, capsys, environ, argv, variables, needle):
    for key, value in variables.items():
        environ.setenv(key, value)
    device = "run.device=auto" if variables else "run.device=cuda"
    argv = [a.replace("{tmp}", str(tmp_path / "ckpt")) for a in argv]  # a directory that exists: the device comes next
    (tmp_path / "ckpt").mkdir()
    code, out, err = run([*argv, "--config", str(config), device], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()  # no run directory, no rank


def test_a_config_name_that_is_not_shipped_is_one_line_in_every_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for form in (["local", "--nproc", "2", "--dry-run"], ["slurm", "--nodes", "1"]):
        code, out, err = run(["launch", *form, "--config", "vimoe_s14_imagnet"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "'vimoe_s14_imagnet' is neither a file nor a shipped config; shipped: " in err


def test_the_launchers_say_what_they_checked(config, capsys):
    code, out, err = run(["launch", "local", "--nproc", "2", "--dry-run", "--config", str(config)], capsys)
    assert code == 0 and " --num_gpus=2 " in out, err
    want = "# checked: --nproc 2; run.device auto (cpu here); data.train: 1 shards, 2 samples; data.val: 1 shards"
    assert err.startswith(want if not torch.cuda.is_available() else "# checked: --nproc 2"), err
