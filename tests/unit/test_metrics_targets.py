"""Every rank's actual host:port in RUN_DIR/prometheus_targets.json (one process here; two ranks in
tests/multiproc/test_metrics_targets_ranks.py), `vimoe metrics targets`, and shipped ports away from the exporters'."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from support import run_cli

from vimoe_dist.config import load_config
from vimoe_dist.metrics import build_metrics
from vimoe_dist.net import free_port_block

REPO = Path(__file__).resolve().parents[2]


def make(tmp_path: Path, *extra: str):
    cfg = load_config(None, ["train.progress=false", *extra])
    return build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1)


def test_one_process_publishes_its_endpoint_and_empties_the_file_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    port = free_port_block(1)
    metrics = make(tmp_path, f"metrics.port={port}")
    path = metrics.publish_targets()
    assert path == tmp_path / "prometheus_targets.json"
    node = socket.gethostname()
    assert json.loads(path.read_text()) == [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"node": node, "slurm_job_id": "4242"}}
    ]
    metrics.close()
    assert json.loads(path.read_text()) == []  # Prometheus forgets a finished job's endpoints


def test_any_address_publishes_the_host_name(tmp_path):
    port = free_port_block(1)
    metrics = make(tmp_path, f"metrics.port={port}", "metrics.addr=0.0.0.0")
    try:
        (group,) = json.loads(metrics.publish_targets().read_text())
    finally:
        metrics.close()
    assert group["targets"] == [f"{socket.gethostname()}:{port}"]


def test_port_zero_publishes_nothing(tmp_path):
    metrics = make(tmp_path)
    assert metrics.publish_targets() is None
    metrics.close()
    assert not (tmp_path / "prometheus_targets.json").exists()


def test_cli_prints_or_copies_a_runs_targets(tmp_path, capsys):
    port = free_port_block(1)
    metrics = make(tmp_path / "run", f"metrics.port={port}")
    metrics.publish_targets()
    try:
        code, out, _ = run_cli(["metrics", "targets", str(tmp_path / "run")], capsys)
        assert code == 0 and json.loads(out)[0]["targets"] == [f"127.0.0.1:{port}"]
        sd = tmp_path / "file_sd" / "job.json"
        code, out, _ = run_cli(["metrics", "targets", str(tmp_path / "run"), "--out", str(sd)], capsys)
        assert code == 0 and out == f"wrote {sd}: 1 targets\n"
        assert json.loads(sd.read_text()) == json.loads((tmp_path / "run" / "prometheus_targets.json").read_text())
    finally:
        metrics.close()


def test_cli_slurm_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    code, out, _ = run_cli(["metrics", "targets", "--slurm", "--port", "19400"], capsys)
    assert code == 0
    assert [g["targets"] for g in json.loads(out)] == [["gpu07:19400", "gpu07:19401"], ["gpu08:19400", "gpu08:19401"]]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["metrics", "targets"], "give either RUN_DIR or --slurm --port N"),
        (["metrics", "targets", "RUN", "--slurm", "--port", "1"], "give either RUN_DIR or --slurm --port N"),
        (["metrics", "targets", "--slurm"], "--slurm needs --port N"),
        (["metrics", "targets", "RUN", "--port", "19400"], "--port goes with --slurm"),
        (["metrics", "targets", "NOPE"], "prometheus_targets.json: no such file"),
    ],
)
def test_cli_bad_input_is_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("vimoe metrics: error: ") and needle in err and err.count("\n") == 1, err


def test_shipped_configs_keep_off_the_exporters_ports():
    """dcgm-exporter (9400), node-exporter (9100) and the rest of 9100-9999, Prometheus and its Alertmanager and
    Pushgateway (9090-9093) are taken on GPU nodes; a rank r serves on port + r, up to 8 ranks per node."""
    files = sorted((REPO / "vimoe_dist" / "configs").rglob("*.yaml"))  # the shipped configs (`configs` links here)
    assert files
    for path in files:
        port = ((yaml.safe_load(path.read_text()) or {}).get("metrics") or {}).get("port")
        if port:
            assert not set(range(port, port + 8)) & set(range(9090, 10000)), (path, port)
    (imagenet,) = [p for p in files if p.name == "vimoe_s14_imagenet.yaml"]
    assert load_config(imagenet).metrics.port == 19400
