"""`vimoe doctor` as a user runs it, on this CPU machine: every check answers, the JSON says what the report says,
the exit code follows the failures, `--gpu-bench` without a GPU is one line, and nothing takes long. The failing
run uses real failures: a taken port, missing shards, a full file system for the run and (in a private mount
namespace) a /dev/shm of Docker's 64 MB."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vimoe_dist.doctor.result import FAIL, OK, SKIP, STATUSES, WARN, Subprocess
from vimoe_dist.doctor.run import ORDER
from vimoe_dist.doctor.software import check_deepspeed_ops

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
DOCTOR = [sys.executable, "-m", "vimoe_dist", "doctor"]
LIMIT_S = 300  # the doctor's own deadlines keep it far below this even on a loaded 2-core machine


def _run(args: list[str], prefix: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*prefix, *DOCTOR, *args], capture_output=True, text=True, timeout=LIMIT_S, cwd=ROOT)
    return proc, time.perf_counter() - t0


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_doctor_on_this_machine_json_on_stdout():
    proc, seconds = _run(["--json", "-"])
    result = json.loads(proc.stdout)  # stdout holds the JSON alone; the report went to stderr
    assert proc.returncode == result["exit_code"] == (1 if result["summary"]["fail"] else 0)
    names = [c["name"] for c in result["checks"]]
    assert names == [n for n in ORDER if n in names]
    assert set(names) == {"python", "torch", "cuda", "nccl", "deepspeed", "deepspeed_ops", "gpus", "infiniband",
                          "shm", "open_files", "disk", "metrics_ports"}  # fmt: skip
    by_name = {c["name"]: c for c in result["checks"]}
    assert all(c["status"] in STATUSES and "\n" not in c["summary"] for c in result["checks"])
    assert all(c["fix"] for c in result["checks"] if c["status"] in (WARN, FAIL))
    assert by_name["python"]["status"] == by_name["torch"]["status"] == by_name["deepspeed"]["status"] == OK
    assert by_name["metrics_ports"]["status"] == SKIP  # no --config
    if _no_gpu():
        assert by_name["gpus"]["status"] == WARN and by_name["nccl"]["status"] == SKIP
        assert by_name["deepspeed"]["data"]["accelerator"] == "cpu"
    assert result["summary"] == {s: sum(c["status"] == s for c in result["checks"]) for s in STATUSES}
    report = proc.stderr.splitlines()
    assert report[0].startswith("vimoe doctor on ") and report[-1].endswith(f"skipped in {result['seconds']:.1f} s")
    for c in result["checks"]:
        assert any(line.split()[:2] == [c["status"], c["name"]] for line in report), c["name"]
    assert seconds < LIMIT_S


@pytest.mark.skipif(not _no_gpu(), reason="this machine has a GPU")
def test_gpu_bench_without_a_gpu_is_one_line_and_exit_2():
    proc, _ = _run(["--gpu-bench"])
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vimoe doctor: error: --gpu-bench needs a CUDA GPU")
    assert "no NVIDIA device on this node" in lines[0]


def test_bad_input_is_one_line():
    proc, _ = _run(["train.steps=3"])
    assert proc.returncode == 2 and proc.stderr == "vimoe doctor: error: key=value overrides need --config FILE\n"
    proc, _ = _run(["--config", "configs/digits.yaml", "model.moe.top_k=9"])
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "model.moe.top_k" in proc.stderr


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


def _private_shm(size: str) -> tuple[str, ...]:
    """A command prefix that runs the doctor in a mount namespace of its own whose /dev/shm is a fresh tmpfs of
    `size`, or () where this process may not create one."""
    if shutil.which("unshare") is None:
        return ()
    probe = subprocess.run(["unshare", "-m", "--", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs /dev/shm"],
                           capture_output=True)  # fmt: skip
    if probe.returncode:
        return ()
    return ("unshare", "-m", "--", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" "$@"')


def test_failing_checks_exit_1_and_say_so(tmp_path):
    full = tmp_path / "full"
    full_fs = _mount_tmpfs(full, "1m")
    try:
        if full_fs:
            (full / "filler").write_bytes(b"\0" * (1024 * 1024 - 8192))
        out_dir = full / "run" if full_fs else tmp_path / "run"
        prefix = _private_shm("64m")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proc, seconds = _run([
                "--config", "configs/digits.yaml", f"data.train={tmp_path}/missing-{{000000..000001}}.tar",
                "data.val=null", f"metrics.port={port}", "metrics.port_search=false", f"run.out_dir={out_dir}",
                "--json", str(tmp_path / "d.json"),
            ], prefix)  # fmt: skip
    finally:
        if full_fs:
            subprocess.run(["umount", str(full)], check=False)
    assert proc.returncode == 1, proc.stderr
    result = json.loads((tmp_path / "d.json").read_text())
    by_name = {c["name"]: c for c in result["checks"]}
    assert result["exit_code"] == 1 and result["config"] == "configs/digits.yaml"
    assert by_name["data_train"]["status"] == FAIL and "no shards match" in by_name["data_train"]["summary"]
    assert by_name["data_val"]["status"] == SKIP
    assert by_name["metrics_ports"]["status"] == FAIL and "already in use" in by_name["metrics_ports"]["summary"]
    assert by_name["model"]["status"] == OK and by_name["pretrained"]["status"] == SKIP
    if full_fs:
        assert by_name["disk"]["status"] == FAIL and str(full) in by_name["disk"]["summary"]
    if prefix:
        assert by_name["shm"]["status"] == FAIL and "Docker's 64 MB default" in by_name["shm"]["summary"]
    for c in result["checks"]:
        if c["status"] == FAIL:
            line = next(i for i, text in enumerate(proc.stdout.splitlines()) if text.split()[:2] == ["fail", c["name"]])
            assert proc.stdout.splitlines()[line + 1].strip() == f"fix: {c['fix']}"
    assert f"wrote {tmp_path / 'd.json'}" in proc.stdout
    assert seconds < LIMIT_S


def test_an_unbuilt_deepspeed_op_is_a_warning(tmp_path):
    """The real DeepSpeed probe with an empty extensions folder: the op its CPU accelerator JIT-builds is missing."""
    facts, why = Subprocess(["-m", "vimoe_dist.parallel.probe", "deepspeed"], 180,
                            {"TORCH_EXTENSIONS_DIR": str(tmp_path)}).result()  # fmt: skip
    assert facts is not None, why
    if facts["accelerator"] != "cpu":
        pytest.skip(f"DeepSpeed's {facts['accelerator']} accelerator JIT-builds no op at start")
    assert facts["ops"] == [{"name": "deepspeed_shm_comm", "kind": "jit", "status": "not_built"}]
    check = check_deepspeed_ops(facts)
    assert check.status == WARN and "first run JIT-builds it" in check.summary
    assert list(tmp_path.iterdir()) == []  # the probe built nothing
