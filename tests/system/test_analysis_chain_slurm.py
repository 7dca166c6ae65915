"""`vimoe study layers --slurm --wait` on the real test cluster (launcher/dev/slurm-cluster.sh): one job array, one
task per point, each task picks its point by array index and starts it under srun; after the array ends the
command draws Figure 2 from the runs' eval.json.

Each task runs a stand-in trainer (the `--launch` prefix, as a user would give `torchrun ...`) that writes what a
finished run leaves: four real training runs would take many minutes on this 2-core machine, and training under
Slurm is covered by the launcher's own system tests. The stand-in checks it runs as a Slurm array task under srun.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from support import FAKE_TRAINER_HEAD

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

STAND_IN = (
    FAKE_TRAINER_HEAD
    + """
assert "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_STEP_ID" in os.environ  # an array task, inside srun
(out / "config.yaml").write_text(yaml.safe_dump(cfg))
(out / "eval.json").write_text(json.dumps({"top1": top1, "top5": 1.0, "loss": 1.0, "images": 1}))
(out / "task.json").write_text(json.dumps({"task": os.environ["SLURM_ARRAY_TASK_ID"], "host": os.uname().nodename}))
"""
)


def test_study_as_slurm_array(slurm_cluster, tmp_path) -> None:
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    out = tmp_path / "study"
    result = slurm_cluster.run(
        sys.executable, "-m", "vimoe_dist", "study", "layers", "--config", str(REPO / "configs" / "digits.yaml"),
        "--L", "0,1,2", "--both", "--out", str(out), "--slurm", "--wait", "--time", "5",
        "--launch", f"{shlex.quote(sys.executable)} {shlex.quote(str(stand_in))}",
        timeout=600,
    )  # fmt: skip
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((out / "slurm").glob("*.out")))
    assert "submitted array job" in result.stdout, result.stdout + result.stderr + logs
    names = ["L0-dense", "L1-shared", "L1-noshared", "L2-shared", "L2-noshared"]
    tasks = {n: json.loads((out / n / "task.json").read_text()) for n in names}
    assert [tasks[n]["task"] for n in names] == ["0", "1", "2", "3", "4"], logs
    assert len(list((out / "slurm").glob("vimoe-study-*_*.out"))) == 5  # one log per array task
    results = json.loads((out / "study.json").read_text())
    assert {(r["L"], r["variant"]) for r in results} == {
        (0, "dense"),
        (1, "shared expert"),
        (1, "no shared expert"),
        (2, "shared expert"),
        (2, "no shared expert"),
    }
    assert (out / "top1_vs_L.png").read_bytes()[:4] == b"\x89PNG"
