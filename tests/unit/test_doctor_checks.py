"""The doctor's checks one by one (vimoe_dist/doctor/): each answer ok / warn / fail with a one-line fix, and none
can hang. Small and full file systems are real tmpfs mounts (skipped where this process may not mount); GPU and
InfiniBand facts cannot exist on this machine, so those checks get the facts a GPU node's probe writes (the probe
itself runs for real in test_doctor_cli.py) and a directory laid out like /sys/class/infiniband."""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vimoe_dist.doctor import node, software
from vimoe_dist.doctor.inputs import check_model, check_pretrained, check_shard
from vimoe_dist.doctor.result import FAIL, OK, SKIP, WARN, Check, Subprocess, bounded
from vimoe_dist.errors import UserError

MIB = 2**20


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs of that size; unmounted afterwards."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = ",".join([f"size={size}", *options])
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): these checks are tested on real ones")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)


def _one_line(check: Check) -> None:
    assert "\n" not in check.summary and "\n" not in check.fix
    if check.status in (WARN, FAIL):
        assert check.fix


# ---------------------------------------------------------------------------------------------- /dev/shm, disk


def test_shm_at_dockers_default_fails(tmpfs):
    check = node.check_shm(str(tmpfs("64m")))
    assert check.status == FAIL and "Docker's 64 MB default" in check.summary and "--shm-size" in check.fix
    _one_line(check)


def test_shm_thresholds_without_and_with_a_config(tmpfs):
    assert node.check_shm(str(tmpfs("256m"))).status == FAIL  # under 512 MiB
    mid = str(tmpfs("1g"))
    assert node.check_shm(mid).status == WARN  # under 2 GiB
    # with the run's needs: (one batch per worker, with prefetching)
    assert node.check_shm(mid, need=(100 * MIB, 200 * MIB)).status == OK
    assert node.check_shm(mid, need=(100 * MIB, 2000 * MIB)).status == WARN
    check = node.check_shm(mid, need=(2000 * MIB, 4000 * MIB))
    assert check.status == FAIL and "one batch per worker" in check.summary and "num_workers" in check.fix


def test_shm_need_counts_every_worker_of_every_local_rank():
    image = 3 * 224 * 224 * 4  # a float32 ImageNet image
    least, comfortable = node.shm_need(image, micro_batch=128, num_workers=10, prefetch=2, local_ranks=8)
    assert least == 80 * 128 * image and comfortable == 2 * least


def test_disk_full_and_read_only(tmpfs):
    full = tmpfs("1m")
    (full / "filler").write_bytes(b"\0" * (1024 * 1024 - 8192))  # what a tmpfs of 1 MiB takes before it is full
    check = node.check_disk(str(full / "run"))  # the run directory need not exist yet: its parent is checked
    assert check.status == FAIL and str(full) in check.summary
    _one_line(check)
    check = node.check_disk(str(tmpfs("8m", "ro") / "run"))
    assert check.status == FAIL and "not writable" in check.summary
    roomy = tmpfs("3g")  # a tmpfs takes memory only for what is written into it
    assert node.check_disk(str(roomy), checkpoint_bytes=100 * MIB, keep=2).status == OK  # 3 x 100 MiB + 1 GiB
    assert node.check_disk(str(roomy), checkpoint_bytes=800 * MIB, keep=2).status == WARN  # 3 x 800 MiB + 1 GiB
    assert node.check_disk(str(roomy), checkpoint_bytes=2500 * MIB, keep=2).status == FAIL  # not even one
    assert node.check_disk(str(roomy)).status == WARN  # without a config: under 20 GiB


def test_disk_refuses_a_file_as_run_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    assert node.check_disk(str(tmp_path / "f" / "run")).status == FAIL


# ---------------------------------------------------------------------------------------------- open files, ports


@pytest.mark.parametrize(("soft", "status"), [(512, FAIL), (2048, WARN), (8192, OK)])
def test_open_files_limit(soft, status):
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    if saved[1] != resource.RLIM_INFINITY and saved[1] < soft:
        pytest.skip(f"the hard limit {saved[1]} is below {soft}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, saved[1]))
    try:
        check = node.check_open_files()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    assert check.status == status and check.data["soft"] == soft
    _one_line(check)


def test_metrics_ports_taken_free_and_off():
    from vimoe_dist.net import free_port_block

    base = free_port_block(2)
    with socket.socket() as taken:  # a live listener on local rank 1's port
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        check = node.check_metrics_ports(base, "127.0.0.1", local_ranks=2)
        assert check.status == FAIL and "already in use" in check.summary and "local rank 1" in check.summary
        _one_line(check)
        assert node.check_metrics_ports(base, "127.0.0.1", local_ranks=1).status == OK
        assert node.check_metrics_ports(base, "127.0.0.1", local_ranks=2, search=True).status == WARN
    assert node.check_metrics_ports(base, "127.0.0.1", local_ranks=2).status == OK  # released: free again
    assert node.check_metrics_ports(0, "127.0.0.1", local_ranks=8).status == SKIP


# ---------------------------------------------------------------------------------------------- InfiniBand


def _hca(root: Path, name: str, state: str, rate: str = "200 Gb/sec (4X HDR)") -> None:
    port = root / name / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text(f"{state}\n")
    (port / "rate").write_text(f"{rate}\n")
    (port / "link_layer").write_text("InfiniBand\n")


def test_infiniband(tmp_path):
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    assert node.check_infiniband(str(sys_root), str(dev_root)).status == WARN  # no device at all
    _hca(sys_root, "mlx5_0", "1: DOWN")
    assert node.check_infiniband(str(sys_root), str(dev_root)).status == WARN
    _hca(sys_root, "mlx5_1", "4: ACTIVE")
    check = node.check_infiniband(str(sys_root), str(dev_root))
    assert check.status == FAIL and "--device /dev/infiniband" in check.fix  # the container cannot see the HCA
    (dev_root / "uverbs1").write_text("")
    check = node.check_infiniband(str(sys_root), str(dev_root))
    assert "mlx5_1:1 200 Gb/sec (4X HDR) (InfiniBand)" in check.summary
    if node._libibverbs_loads():  # depends on the image: both answers are checked, whichever this one gives
        assert check.status == OK
    else:
        assert check.status == FAIL and "rdma-core" in check.fix


# ---------------------------------------------------------------------------------------------- facts from a probe

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85 * 2**30, "free_bytes": 84 * 2**30,
        "capability": [9, 0], "bf16": True, "multiprocessors": 132}  # fmt: skip


def _facts(devices=(), **kw) -> dict:
    facts = {"python": "3.11.7", "torch": "2.14.1+cu130", "cuda_build": "13.0", "hip_build": None,
             "nccl_available": True, "nccl": "2.27.5", "cuda_available": bool(devices), "devices": list(devices),
             "nvidia_devices": [f"/dev/nvidia{d['index']}" for d in devices], "nvidia_driver": None,
             "cuda_visible_devices": None}  # fmt: skip
    return {**facts, **kw}


def test_gpu_node_facts():
    facts = _facts([H100, {**H100, "index": 1}])
    check = software.check_gpus(facts)
    assert check.status == OK and check.summary.startswith("2 x NVIDIA H100 80GB HBM3, 85 GiB each")
    assert check.data["peaks"] == {"NVIDIA H100 80GB HBM3": "H100 SXM"}
    assert software.check_nccl(facts).status == OK and software.check_cuda(facts).status == OK
    busy = software.check_gpus(_facts([{**H100, "free_bytes": 40 * 2**30}]))
    assert busy.status == WARN and "already has 45.0 GiB in use" in busy.summary


def test_gpu_without_bf16_fails_a_bf16_run_and_an_unknown_gpu_asks_for_its_peak():
    v100 = {**H100, "name": "Tesla V100-SXM2-32GB", "capability": [7, 0], "bf16": False}
    assert software.check_gpus(_facts([v100]), precision="bf16").status == FAIL
    assert software.check_gpus(_facts([v100]), precision="fp16").status == OK
    unknown = _facts([{**H100, "name": "NVIDIA Future 9000"}])
    check = software.check_gpus(unknown)
    assert check.status == WARN and "'NVIDIA Future 9000'" in check.summary and "--peak-tflops" in check.fix
    _one_line(check)
    assert software.check_gpus(unknown, peak_tflops=500).status == OK


def test_gpus_present_but_unusable():
    facts = _facts(nvidia_devices=["/dev/nvidia0"], nvidia_driver="NVRM version: 470.0")
    check = software.check_cuda(facts)
    assert check.status == FAIL and "cannot use them" in check.summary
    assert software.check_cuda(_facts(nvidia_devices=["/dev/nvidia0"], cuda_build=None)).status == FAIL
    assert software.check_cuda(_facts()).status == SKIP  # no GPU hardware at all
    assert software.check_gpus(_facts()).status == WARN
    assert software.check_torch(None, "exit status 1: ImportError: libcudart").status == FAIL


def test_deepspeed_ops_answers():
    loaded = {"deepspeed": "0.19.8", "accelerator": "cpu", "comm_backend": "gloo",
              "ops": [{"name": "deepspeed_shm_comm", "kind": "jit", "status": "loaded"}]}  # fmt: skip
    assert software.check_deepspeed_ops(loaded).status == OK
    missing = {**loaded, "ops": [{"name": "deepspeed_shm_comm", "kind": "jit", "status": "not_built"}]}
    check = software.check_deepspeed_ops(missing)
    assert check.status == WARN and "JIT-builds" in check.summary and "ShareMemCommBuilder" in check.fix
    broken = {**loaded, "ops": [{"name": "fused_adam", "kind": "prebuilt", "status": "error", "error": "undefined"}]}
    assert software.check_deepspeed_ops(broken).status == FAIL
    gpu_node = _facts([H100])
    assert software.check_deepspeed(loaded, "", gpu_node).status == FAIL  # DeepSpeed on its CPU accelerator
    assert software.check_deepspeed(None, "exit status 1: ModuleNotFoundError", None).status == FAIL


# ---------------------------------------------------------------------------------------------- bounds


def test_a_hanging_check_fails_at_its_deadline():
    t0 = time.perf_counter()
    check = bounded("stuck", lambda: time.sleep(30) or Check("stuck", OK, "never"), timeout_s=1)
    assert check.status == FAIL and "no answer within 1 s" in check.summary
    assert time.perf_counter() - t0 < 5
    check = bounded("raises", lambda: 1 / 0, timeout_s=5)
    assert check.status == FAIL and "ZeroDivisionError" in check.summary


def _session_gone(sid: int, wait_s: float = 10) -> bool:
    """No live process left in session `sid` (SIGKILL is delivered asynchronously; zombies count as gone)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-o", "stat=", "-s", str(sid)], capture_output=True, text=True).stdout.split()
        if all(state.startswith("Z") for state in ps):
            return True
        time.sleep(0.2)
    return False


def test_a_hanging_child_is_killed_with_its_group_at_the_deadline():
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    t0 = time.perf_counter()
    proc = Subprocess(["-c", code], timeout_s=2)
    payload, why = proc.result()
    assert payload is None and why == "no answer within 2 s" and time.perf_counter() - t0 < 10
    assert _session_gone(proc.proc.pid)  # the sleep it started went with it
    payload, why = Subprocess(["-c", "import sys; print('boom'); sys.exit(3)"], timeout_s=30).result()
    assert payload is None and why == "exit status 3: boom"


# ---------------------------------------------------------------------------------------------- the run's inputs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vimoe_dist.data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out))
    return out


def _cfg(*overrides: str):
    from vimoe_dist.config import load_config

    return load_config(Path(__file__).parents[2] / "configs" / "digits.yaml", list(overrides))


@pytest.mark.slow
def test_shards_decode_and_broken_ones_fail(digits, tmp_path):
    cfg = _cfg(f"data.train={digits}/train-{{000000..000011}}.tar", f"data.val={digits}/val-000000.tar")
    check = check_shard(cfg, "data.train")
    assert check.status == OK and "12 shard(s)" in check.summary and "decode to (3, 16, 16)" in check.summary
    assert check_shard(cfg, "data.val").status == OK
    broken = tmp_path / "train-000000.tar"
    broken.write_bytes((digits / "train-000000.tar").read_bytes()[:1500])  # cut inside the first sample
    check = check_shard(_cfg(f"data.train={broken}"), "data.train")
    assert check.status == FAIL and "unreadable" in check.summary
    _one_line(check)
    assert check_shard(_cfg("data.val=null"), "data.val").status == SKIP


def test_pretrained_file_loads_or_fails(tmp_path):
    import torch

    from vimoe_dist.config import ConfigError
    from vimoe_dist.model import build_dense

    cfg = _cfg()
    good = tmp_path / "dense.pth"
    torch.save(build_dense(cfg.model).state_dict(), good)
    check = check_pretrained(_cfg(f"model.pretrained={good}"))
    assert check.status == OK and "loads into the model" in check.summary
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot load"):  # `bounded` turns it into a fail with this message
        check_pretrained(_cfg(f"model.pretrained={corrupt}"))
    assert bounded("pretrained", lambda: check_pretrained(_cfg(f"model.pretrained={corrupt}")), 60).status == FAIL
    assert check_pretrained(_cfg(f"model.pretrained={tmp_path}/missing.pth")).status == FAIL
    assert check_pretrained(cfg).status == SKIP


def test_model_check_reports_size_and_flops():
    check = check_model(_cfg())
    assert check.status == OK and check.data["params"] > 1e6
    flops = check.data["flops_per_image"]
    assert flops["training"] == 3 * flops["forward"] and "GFLOP per image" in check.summary
    assert check.data["checkpoint_bytes"] == 16 * check.data["params"]


def test_gpu_bench_config_is_the_run_on_one_gpu_in_bf16():
    from vimoe_dist.doctor.gpu_bench import bench_config, shipped_config

    cfg = bench_config(None, [], None, "/tmp/unused")  # the shipped ViMoE-S/14: 1024 images over ep_size 8
    assert shipped_config().name == "vimoe_s14_imagenet.yaml"
    assert (cfg.model.backbone, cfg.model.img_size, cfg.train.global_batch_size) == (
        "vit_small_patch14_dinov2",
        224,
        128,
    )
    assert (cfg.parallel.ep_size, cfg.parallel.precision, cfg.model.pretrained) == (1, "bf16", None)
    assert bench_config(None, [], 64, "/tmp/unused").train.global_batch_size == 64
    with pytest.raises(UserError, match=r"not a multiple of model\.moe\.group_size=32"):
        bench_config(None, [], 48, "/tmp/unused")
