"""Two ranks (torchrun, gloo) publish their actual endpoints: rank 1's port is taken, it serves on the next free one
with one warning, and rank 0 writes both real host:port pairs to RUN_DIR/prometheus_targets.json, each of which
answers /metrics with that rank's series while the job runs; the file is emptied when the job ends."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vimoe_dist.net import free_port_block

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

WORKER = r"""
import datetime, json, os, sys, urllib.request
import torch.distributed as dist
from vimoe_dist.config import load_config
from vimoe_dist.metrics import build_metrics

run, port = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
cfg = load_config(None, [f"metrics.port={port}", "metrics.job=targets-test", "train.progress=false"])
metrics = build_metrics(cfg, rank=rank, local_rank=local_rank, world_size=2, run_dir=run, total_steps=1)
path = metrics.publish_targets()
if rank == 0:
    groups = json.loads(path.read_text())
    answers = []
    for target in groups[0]["targets"]:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=30) as r:
            body = r.read().decode()
        answers.append([r.status, [f'rank="{i}"' in body for i in range(2)]])
    print("RESULT " + json.dumps({"groups": groups, "answers": answers}), flush=True)
dist.barrier()  # rank 1 keeps serving until rank 0 has scraped it
metrics.close()
dist.destroy_process_group()
"""


def test_two_ranks_publish_the_ports_they_really_bound(tmp_path):
    port = free_port_block(3)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run = tmp_path / "run"
    with socket.socket() as taken:  # another program holds rank 1's port (metrics.port + local rank 1)
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
             str(run), str(port)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    (group,) = result["groups"]
    assert group["targets"] == [f"127.0.0.1:{port}", f"127.0.0.1:{port + 2}"]  # rank order
    assert group["labels"]["node"] == socket.gethostname()
    assert result["answers"] == [[200, [True, False]], [200, [False, True]]]  # each target is that rank
    moved = [x for x in done.stderr.splitlines() if "in use" in x]
    assert len(moved) == 1 and f"serving metrics on port {port + 2} instead" in moved[0], done.stderr
    assert json.loads((run / "prometheus_targets.json").read_text()) == []
