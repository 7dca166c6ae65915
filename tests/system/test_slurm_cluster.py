"""The Slurm side of `vimoe launch` on a real cluster, with a tiny gloo all-reduce rank (allreduce_rank.py) in place
of the trainer so each job takes seconds: hostlist expansion against `scontrol show hostnames`, rank resolution in
1-node and 2-node srun steps (two slurmd in separate network namespaces), and the sbatch template's
checkpoint-and-requeue path on SIGUSR1. Training jobs on the same cluster are in test_slurm_train.py.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from vimoe_dist.errors import UserError
from vimoe_dist.launch.hostlist import expand_hostlist
from vimoe_dist.launch.rendezvous import slurm_master_port
from vimoe_dist.launch.resources import load_template
from vimoe_dist.launch.sbatch import SlurmJob, render_sbatch

pytestmark = [pytest.mark.system, pytest.mark.slow]

RANK_SCRIPT = Path(__file__).with_name("allreduce_rank.py")


def random_hostlists(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        items = []
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(["n", "gpu-a", "node", "x1y"])
            for _ in range(rng.randint(0, 2)):
                width = rng.choice([1, 2, 3])
                ranges = []
                for _ in range(rng.randint(1, 3)):
                    lo = rng.randint(0, 12)
                    hi = lo + rng.randint(0, 4)
                    pad = rng.random() < 0.5
                    fmt = (lambda v, w=width: str(v).zfill(w)) if pad else str
                    ranges.append(fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}")
                name += f"[{','.join(ranges)}]" + rng.choice(["", "-b"])
            items.append(name.removesuffix("-b"))
        out.append(",".join(items))
    return out


def test_hostlist_expansion_matches_scontrol(slurm_cluster):
    exprs = [
        "node[01-04,07]", "gpu-a[1-2]-b[3-4]", "n[8-10]", "n[08-10]", "n[9-011]", "a,b[1-2],c", "n[1-3,3]",
        "vn[1-2]", "rack[1-2]-gpu[001-003],login1", *random_hostlists(seed=5, count=60),
    ]  # fmt: skip
    # one scontrol call per expression, in one shell, separated by markers
    script = "".join(f"echo '@@'; scontrol show hostnames '{e}' 2>&1 || echo '!!error'; " for e in exprs)
    out = slurm_cluster.run("bash", "-c", script).stdout
    answers = out.split("@@\n")[1:]
    assert len(answers) == len(exprs)
    for expr, answer in zip(exprs, answers):
        lines = answer.split()
        if "!!error" in lines or any("Invalid" in line for line in lines):
            with pytest.raises(UserError):
                expand_hostlist(expr)
        else:
            assert expand_hostlist(expr) == lines, expr


def run_ranks(slurm_cluster, tmp_path: Path, *srun_args: str) -> list[dict]:
    slurm_cluster.run(
        "srun", "--kill-on-bad-exit=1", *srun_args, sys.executable, str(RANK_SCRIPT), str(tmp_path), "2", "0",
        timeout=180,
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    return sorted(records, key=lambda r: r["rank"])


def test_one_node_two_tasks_resolve_from_slurm(slurm_cluster, tmp_path):
    records = run_ranks(slurm_cluster, tmp_path, "--nodes=1", "--ntasks-per-node=2")
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in records] == [(0, 0, 2), (1, 1, 2)]
    assert {r["source"] for r in records} == {"slurm"}
    assert {r["host"] for r in records} == {records[0]["master"].split(":")[0]}


def test_two_nodes_talk_over_their_own_network(slurm_cluster, tmp_path):
    records = run_ranks(slurm_cluster, tmp_path, "--nodes=2", "--ntasks-per-node=1")
    assert [(r["rank"], r["local_rank"], r["node_rank"], r["num_nodes"]) for r in records] == [
        (0, 0, 0, 2),
        (1, 0, 1, 2),
    ]
    assert [r["host"] for r in records] == ["vn1", "vn2"]  # each rank ran in its own node's namespace
    master, port = records[0]["master"].split(":")
    assert master == "vn1" and {r["master"] for r in records} == {records[0]["master"]}
    assert 20000 <= int(port) < 32000
    assert all(r["end"] == 2 for r in records)  # both all-reduces crossed the link


def test_sbatch_template_requeues_on_usr1_and_resumes(slurm_cluster, tmp_path):
    """The time-limit path: SIGUSR1 to every rank (what `--signal=USR1@grace` sends), the ranks checkpoint and exit
    75, the script requeues the job, and the second run starts from the checkpointed step."""
    out = tmp_path / "out"
    out.mkdir()
    job = SlurmJob(
        command=[sys.executable, str(RANK_SCRIPT), str(out), "24", "0.5"],
        nodes=2,
        log_dir=str(tmp_path / "logs"),
        workdir=str(tmp_path),
        job_name="requeue-test",
        time="10",
    )
    (tmp_path / "logs").mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job, load_template()))
    job_id = slurm_cluster.submit(script)
    try:
        # signal mid-run, once the ranks are stepping (before, Python's default USR1 action would kill them)
        progress = out / "progress.txt"
        slurm_cluster.wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 3, 180, "3 steps")
        slurm_cluster.signal(job_id, "USR1")
        info = slurm_cluster.wait(job_id, timeout=240)
    finally:
        slurm_cluster.cancel(job_id)
    log = slurm_cluster.logs(tmp_path / "logs")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    records = [json.loads(line) for line in (out / "ranks.jsonl").read_text().splitlines()]
    first = [r for r in records if r["restart"] == "0"]
    second = [r for r in records if r["restart"] == "1"]
    assert len(first) == len(second) == 2, log
    assert {r["signal"] for r in first} == {10} and 0 < first[0]["end"] < 24, log
    assert {r["start"] for r in second} == {first[0]["end"]} and {r["end"] for r in second} == {24}, log
    assert {r["master"] for r in records} == {f"vn1:{slurm_master_port(job_id)}"}
    assert "requeueing job" in log


def test_quoted_values_and_the_prometheus_link_on_a_real_cluster(slurm_cluster, tmp_path):
    """sbatch reads quoted #SBATCH values back (a log directory with a space, '#' and '%'), srun passes the job's
    environment on (a value that would run a command stays data), and the job links this run's Prometheus targets
    into the file_sd directory while it runs and removes the link when it ends."""
    run_dir, sd_dir, log_dir = tmp_path / "run", tmp_path / "sd", tmp_path / "logs a#b%c"
    for directory in (run_dir, sd_dir, log_dir):
        directory.mkdir()
    marker = tmp_path / "MARK"
    rank = (
        'echo "[]" > "$RUN/t.json" && mv "$RUN/t.json" "$RUN/prometheus_targets.json"; '
        'for i in $(seq 60); do [ -L "$SD/$SLURM_JOB_ID.json" ] && { echo "linked, X=$X"; exit 0; }; sleep 1; done; '
        "exit 3"
    )
    job = SlurmJob(
        command=["bash", "-c", rank],
        log_dir=str(log_dir),
        workdir=str(tmp_path),
        job_name="prom-link",
        time="5",
        signal_grace=60,
        env=[f"RUN={run_dir}", f"SD={sd_dir}", f"X=$(touch {marker})"],
        run_dir=str(run_dir),
        prometheus_sd_dir=str(sd_dir),
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job, load_template()))
    job_id = slurm_cluster.submit(script)
    try:
        info = slurm_cluster.wait(job_id, timeout=180)
    finally:
        slurm_cluster.cancel(job_id)
    log_file = log_dir / f"prom-link-{job_id}.out"
    log = log_file.read_text() if log_file.exists() else slurm_cluster.logs(log_dir)
    assert info["JobState"] == "COMPLETED" and log_file.exists(), (info, log)
    assert f"linked, X=$(touch {marker})" in log and not marker.exists(), log
    assert not (sd_dir / f"{job_id}.json").is_symlink()  # gone with the job
