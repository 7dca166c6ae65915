"""vimoe_dist/launch/monitoring: the Grafana dashboard and Prometheus files refer to series the exporter really has; the
Slurm targets file lists one target per rank; the metrics package imports without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vimoe_dist.errors import UserError
from vimoe_dist.metrics.exporter import TrainingCollector
from vimoe_dist.metrics.prometheus import PrometheusSink
from vimoe_dist.metrics.targets import main as targets_main
from vimoe_dist.metrics.targets import slurm_targets

MONITORING = Path(__file__).resolve().parents[2] / "vimoe_dist" / "launch" / "monitoring"
SERIES = re.compile(r"\bvimoe_[a-z0-9_]+\b")


def exported_sample_names() -> set[str]:
    sink = PrometheusSink(TrainingCollector("j", 0, {"version": "0"}, 10))
    sink.on_step(1, 1, 0.1, 0.0, 0.0)
    sink.on_log({"step": 1, "loss": 1.0, "lr": 0.1, "images_per_sec": 1.0, "grad_norm": 1.0, "bad_samples": 0,
                 "tokens_per_sec": 17.0, "flops_per_image": 3e9, "achieved_tflops": 120.0, "mfu": 0.4,
                 "gpu_allocated_bytes": 1, "gpu_reserved_bytes": 2, "gpu_peak_allocated_bytes": 3,
                 "moe": {"0": {"tokens": [1, 2], "dropped": 0, "entropy": 0.5, "imbalance": 1.3}}})  # fmt: skip
    sink.on_eval({"step": 1, "eval_top1": 0.1, "eval_top5": 0.2, "eval_loss": 3.0})
    sink.on_checkpoint(1, 0.1)
    sink.on_event("bad_step")
    names = {s.name for f in text_string_to_metric_families(sink.render().decode()) for s in f.samples}
    sink.close()
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    return exprs


def test_dashboard_queries_only_exported_series():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exported = exported_sample_names()
    exprs = dashboard_exprs(dashboard)
    used = {name for e in exprs for name in SERIES.findall(e)}
    assert used - exported == set(), "dashboard queries series the exporter does not have"
    for wanted in ("vimoe_train_images_total", "vimoe_moe_tokens_total", "vimoe_train_step_seconds_bucket",
                   "vimoe_moe_load_imbalance", "vimoe_moe_router_entropy", "vimoe_eval_top1", "vimoe_train_loss",
                   "vimoe_process_resident_memory_bytes", "vimoe_build_info", "vimoe_train_mfu",
                   "vimoe_train_flops_per_second", "vimoe_gpu_memory_allocated_bytes",
                   "vimoe_gpu_memory_reserved_bytes", "vimoe_gpu_memory_peak_allocated_bytes",
                   "vimoe_train_tokens_per_second"):  # fmt: skip
        assert wanted in used, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job", "rank", "layer"}


def test_prometheus_files_use_exported_series_and_keep_rank_labels():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert all(j["honor_labels"] is True for j in jobs.values())  # keeps the ranks' job/rank labels
    assert jobs["vimoe"]["file_sd_configs"][0]["files"]
    static = [t for group in jobs["vimoe-static"]["static_configs"] for t in group["targets"]]
    assert len(static) == len(set(static)) == 8  # 2 nodes x 4 ranks, one target per rank
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    used = {name for g in rules["groups"] for r in g["rules"] for name in SERIES.findall(r["expr"])}
    assert used and used - exported_sample_names() == set()


def test_slurm_targets_one_per_rank(tmp_path, capsys, monkeypatch):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_TASKS_PER_NODE": "4(x2),1", "SLURM_JOB_ID": "4242"}
    groups = slurm_targets(env, 9400)
    assert [g["targets"] for g in groups] == [
        ["gpu07:9400", "gpu07:9401", "gpu07:9402", "gpu07:9403"],
        ["gpu08:9400", "gpu08:9401", "gpu08:9402", "gpu08:9403"],
        ["cpu1:9400"],
    ]
    assert groups[0]["labels"] == {"slurm_job_id": "4242", "node": "gpu07"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "sd" / "4242.json"
    assert targets_main(["--port", "9400", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == groups
    with pytest.raises(UserError, match="3 nodes"):
        slurm_targets({**env, "SLURM_TASKS_PER_NODE": "4"}, 9400)
    with pytest.raises(UserError, match="TCP port"):
        slurm_targets(env, 65534)
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    assert targets_main(["--port", "9400"]) == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err


def test_metrics_package_imports_without_torch_tensorboard_or_wandb():
    modules = ["vimoe_dist.metrics", "vimoe_dist.metrics.cli", "vimoe_dist.metrics.targets"]
    modules += [f"vimoe_dist.metrics.{m}" for m in ("exporter", "prometheus", "server", "jsonl", "progress", "plot")]
    modules += [f"vimoe_dist.metrics.{m}" for m in ("images", "tracking", "tensorboard_sink", "wandb_sink")]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\n"
    code += "print([m for m in ('torch', 'tensorboard', 'wandb') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
