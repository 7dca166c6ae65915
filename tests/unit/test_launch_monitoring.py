"""The Prometheus files shipped with the launcher: valid for promtool, written out by `vimoe launch monitoring`, and
alert rules that page for a rank of a running job that stops answering but stay quiet for a job that ended,
finished or preempted (`promtool test rules` over synthetic series; promtool is Debian's `prometheus` package).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import run_cli

from vimoe_dist.launch.resources import MONITORING_FILES, monitoring_text

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt install prometheus)")

RANK_DOWN = {"alertname": "VimoeRankDown", "severity": "page"}
STALLED = {"alertname": "VimoeTrainingStalled", "severity": "page"}

# 1-minute samples. A running 2-rank job whose rank 1 dies at minute 3; a finished job and a preempted job whose
# targets went away when they ended ("stale"), the preempted one's final values left on the Pushgateway
# (instance=""); a live rank stuck at step 10 of 100.
SERIES = [
    ('up{job="vimoe", instance="n1:9500"}', "1x20"),
    ('up{job="vimoe", instance="n1:9501"}', "1 1 1 0x17"),
    ('up{job="vimoe", instance="done:9500"}', "1 1 1 stale"),
    ('vimoe_train_last_step_timestamp_seconds{job="a", rank="0", instance="done:9500"}', "0 60 120 stale"),
    ('vimoe_train_step{job="a", rank="0", instance="done:9500"}', "98 99 100 stale"),
    ('vimoe_train_steps_target{job="a", rank="0", instance="done:9500"}', "100 100 100 stale"),
    ('up{job="vimoe", instance="preempted:9500"}', "1 1 stale"),
    ('up{job="vimoe-pushgateway", instance="pushgw:9091"}', "1x20"),
    ('vimoe_train_last_step_timestamp_seconds{job="b", rank="0", instance=""}', "60x20"),
    ('vimoe_train_step{job="b", rank="0", instance=""}', "50x20"),
    ('vimoe_train_steps_target{job="b", rank="0", instance=""}', "100x20"),
    ('up{job="vimoe", instance="stuck:9500"}', "1x20"),
    ('vimoe_train_last_step_timestamp_seconds{job="c", rank="3", instance="stuck:9500"}', "0x20"),
    ('vimoe_train_step{job="c", rank="3", instance="stuck:9500"}', "10x20"),
    ('vimoe_train_steps_target{job="c", rank="3", instance="stuck:9500"}', "100x20"),
]


def alert(labels: dict, summary: str) -> dict:
    return {"exp_labels": labels, "exp_annotations": {"summary": summary}}


def promtool_test(tmp_path: Path, alerts_at: list[dict]) -> subprocess.CompletedProcess:
    (tmp_path / "alerts.yml").write_text(monitoring_text("alerts.yml"))
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in SERIES],
                "alert_rule_test": alerts_at,
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run([PROMTOOL, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)


@needs_promtool
def test_the_shipped_files_pass_promtool(tmp_path):
    for name in MONITORING_FILES:
        (tmp_path / name).write_text(monitoring_text(name))
    subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=tmp_path, check=True, capture_output=True)


@needs_promtool
def test_a_rank_that_stops_answering_pages_and_a_job_that_ended_raises_nothing(tmp_path):
    down = alert({**RANK_DOWN, "job": "vimoe", "instance": "n1:9501"},
                 "vimoe rank n1:9501 has not answered Prometheus for 2 minutes")  # fmt: skip
    stuck = alert({**STALLED, "job": "c", "rank": "3", "instance": "stuck:9500"},
                  "vimoe job c rank 3 has not finished a step for 10 minutes")  # fmt: skip
    cases = [
        {"eval_time": "4m", "alertname": "VimoeRankDown", "exp_alerts": []},  # down 1 minute: not yet
        {"eval_time": "6m", "alertname": "VimoeRankDown", "exp_alerts": [down]},
        {"eval_time": "8m", "alertname": "VimoeTrainingStalled", "exp_alerts": []},
        # at 15 min the finished job ("a") and the preempted one ("b", on the Pushgateway) are quiet; "c" is stuck
        {"eval_time": "15m", "alertname": "VimoeTrainingStalled", "exp_alerts": [stuck]},
        {"eval_time": "15m", "alertname": "VimoeRankDown", "exp_alerts": [down]},
    ]
    result = promtool_test(tmp_path, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def sd_files(out: Path) -> list[str]:
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    return next(job for job in config["scrape_configs"] if job["job_name"] == "vimoe")["file_sd_configs"][0]["files"]


def test_launch_monitoring_writes_the_files_with_the_jobs_sd_dir(tmp_path, capsys):
    out = tmp_path / "mon"
    code, printed, _ = run_cli(["launch", "monitoring", "--out", str(out), "--sd-dir", "/gpfs/prom sd/"], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == sorted(MONITORING_FILES)
    assert sd_files(out) == ["/gpfs/prom sd/*.json"]
    assert (out / "alerts.yml").read_text() == monitoring_text("alerts.yml")
    code, printed, err = run_cli(["launch", "monitoring", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err  # nothing overwritten
    code, _, _ = run_cli(["launch", "monitoring", "--out", str(out), "--force"], capsys)
    vimoe = next(
        j for j in yaml.safe_load((out / "prometheus.yml").read_text())["scrape_configs"] if j["job_name"] == "vimoe"
    )
    assert code == 0 and vimoe["file_sd_configs"][0]["files"] == ["/shared/prometheus/vimoe/*.json"]
