"""Metrics never stop training: a full disk under metrics.jsonl is one warning and never a torn line, a failing sink
is one warning and is closed, an endpoint open to the network says it has no authentication.

The full disk is real: a 64 KiB tmpfs mounted in a private user and mount namespace (`unshare -rm`; skipped where
the kernel or the container refuses it), and a file size limit (RLIMIT_FSIZE, EFBIG), which works everywhere.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError
from vimoe_dist.metrics import Metrics, build_metrics
from vimoe_dist.metrics.exporter import TrainingCollector
from vimoe_dist.metrics.jsonl import JsonlSink
from vimoe_dist.metrics.prometheus import PrometheusSink
from vimoe_dist.net import free_port_block

REPO = Path(__file__).resolve().parents[2]
MARK = "--- metrics.jsonl ---"

# Runs in a child process: 40 logged steps into a disk that fills up after a few, then space comes back for 5 more.
CHILD = r"""
import logging, os, resource, signal, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from vimoe_dist.config import load_config
from vimoe_dist.metrics import build_metrics

run, how = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["train.progress=false"])
metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=run, total_steps=45)
if how == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))

def log(step):
    metrics.on_step(step, images=8, step_seconds=0.1)
    metrics.on_log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_sec": 100.0, "note": "x" * 150,
                    "moe": {"5": {"tokens": [1, 2, 3, 4], "dropped": 0, "entropy": 1.0}}})

for step in range(1, 41):
    log(step)
if how == "fsize":
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
else:
    os.remove(os.path.join(run, "filler"))
for step in range(41, 46):
    log(step)
metrics.close()
print("--- metrics.jsonl ---")
print(open(os.path.join(run, "metrics.jsonl")).read(), end="")
"""


def strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def check_full_disk_run(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "metrics.jsonl" in line]
    assert len(warnings) == 2, done.stderr  # one when writing fails, one when it works again
    assert warnings[0].startswith("WARNING") and "training goes on" in warnings[0]
    assert "writing again after" in warnings[1]
    text = done.stdout.split(MARK + "\n", 1)[1]
    assert text.endswith("\n")
    records = [strict(line) for line in text.splitlines()]  # no torn line
    steps = [r["step"] for r in records if "loss" in r]
    (lost,) = [r for r in records if r.get("event") == "metrics_records_lost"]
    kept = len(steps) - 5
    assert 0 < kept < 40 and steps == [*range(1, kept + 1), *range(41, 46)], steps
    assert lost["records"] == 40 - kept and lost["step"] == 41


def test_file_size_limit_is_one_warning_and_never_a_torn_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "fsize"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    check_full_disk_run(done)


def test_full_disk_is_one_warning_and_never_a_torn_line(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode:
        pytest.skip(f"no private tmpfs here: {probe.stderr.strip()}")
    # 64 KiB = 16 pages; the filler takes 15, which leaves metrics.jsonl one page (about 12 records)
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$1" && head -c 61440 /dev/zero > "$1/filler" && exec "$2" -c "$3" "$1" disk'
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(tmp_path), sys.executable, CHILD],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    check_full_disk_run(done)
    assert "No space left on device" in done.stderr


class BrokenSink:
    """A sink whose disk is gone after its first record (a test double: the code under test is `Metrics`)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls, self.closed = 0, False

    def on_step(self, *args) -> None:
        pass

    def on_log(self, record) -> None:
        self.calls += 1
        if self.calls > 1:
            raise OSError(errno.EIO, "Input/output error")

    def close(self) -> None:
        self.closed = True
        raise OSError(errno.EIO, "Input/output error")  # closing it fails too


def test_a_failing_sink_is_one_warning_and_closed_while_the_others_go_on(tmp_path, caplog):
    prometheus = PrometheusSink(TrainingCollector("j", 0, {}, 10))
    broken = BrokenSink()
    metrics = Metrics([broken, JsonlSink(tmp_path), prometheus], prometheus, rank=0)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 6):
            metrics.on_step(step, images=8, step_seconds=0.1)
            metrics.on_log({"step": step, "loss": 1.0})
        metrics.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "metrics: broken failed (OSError: [Errno 5] Input/output error); it is closed and training goes on"
    ]
    assert broken.closed and broken.calls == 2 and broken not in metrics.sinks
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    assert prometheus.collector.counters["steps"] == 5


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # what should be a file is a directory
    cfg = load_config(None, ["train.progress=false"])
    with pytest.raises(UserError, match=r"^metrics.jsonl: cannot write .*metrics.jsonl \(Is a directory\)$"):
        build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1)


@pytest.mark.parametrize(("addr", "warned"), [("0.0.0.0", True), ("::", True), ("127.0.0.1", False), ("::1", False)])
def test_an_endpoint_beyond_loopback_warns_that_it_has_no_authentication(tmp_path, caplog, addr, warned):
    port = free_port_block(1)
    cfg = load_config(None, [f"metrics.port={port}", f"metrics.addr='{addr}'", "train.progress=false"])
    with caplog.at_level(logging.WARNING):
        try:
            metrics = build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1)
        except UserError as e:  # no IPv6 on this host
            pytest.skip(str(e))
        metrics.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warned:
        assert len(warnings) == 1 and warnings[0].startswith(f"metrics.addr {addr}: the /metrics endpoints have no "
                                                             "authentication"), warnings  # fmt: skip
    else:
        assert warnings == []
