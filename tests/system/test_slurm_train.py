"""`vimoe launch slurm --submit` on the real test cluster (conftest.py): the digits config trained expert-parallel as
a 2-node job whose two ranks (ep_size 2) sit in different network namespaces, and as a 1-node 2-task job requeued
mid-run (`scontrol requeue`: SIGTERM to the ranks, a checkpoint, exit 75) that comes back and finishes from its
checkpoint. Runs are cut to a few small steps and share one job where they can: each one still pays for starting
Python, torch and DeepSpeed.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

pytestmark = [pytest.mark.system, pytest.mark.slow]


def submit(slurm_cluster, digits, tmp_path, name: str, nodes: int, tasks: int, steps: int, checkpoint_every: int):
    out = tmp_path / "run"
    result = slurm_cluster.run(
        sys.executable, "-m", "vimoe_dist", "launch", "slurm", "--submit", f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--time=20", "--signal-grace=60", f"--job-name={name}",
        "--config", str(digits.config), *digits.overrides(out, steps, checkpoint_every),
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sbatch --parsable ") and lines[0].endswith(".sbatch"), result.stdout
    job_id = int(re.search(r"submitted job (\d+)", result.stdout).group(1))
    return job_id, out


def finish(slurm_cluster, job_id: int, out, timeout: float = 840) -> tuple[dict, str]:
    try:
        info = slurm_cluster.wait(job_id, timeout=timeout)
    finally:
        slurm_cluster.cancel(job_id)
    return info, slurm_cluster.logs(out / "slurm")


def test_two_nodes_train_with_experts_split_across_the_link(slurm_cluster, digits, tmp_path):
    job_id, out = submit(slurm_cluster, digits, tmp_path, "digits-2n", nodes=2, tasks=1, steps=6, checkpoint_every=0)
    info, log = finish(slurm_cluster, job_id, out)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "vn[1-2]" and info["NumTasks"] == "2", log
    assert yaml.safe_load((out / "config.yaml").read_text())["parallel"]["ep_size"] == 2  # one expert shard per node
    assert digits.steps(out)[-1] == 6 and digits.eval_result(out)["images"] > 0, log
    assert "master vn1:" in log


def test_one_node_job_requeued_mid_run_resumes_and_finishes(slurm_cluster, digits, tmp_path):
    """A 1-node, 2-task job trains the digits config expert-parallel (ep_size 2) and is requeued mid-run."""
    every = 4
    job_id, out = submit(
        slurm_cluster, digits, tmp_path, "digits-rq", nodes=1, tasks=2, steps=30, checkpoint_every=every
    )
    try:
        # requeue mid-run, after the first periodic checkpoint and before the end
        slurm_cluster.wait_for(lambda: any(s > every + 1 for s in digits.steps(out)), 600, f"step {every + 2}")
        seen = max(digits.steps(out))
        assert seen < 30, "the run ended before it could be requeued; make it longer"
        slurm_cluster.run("scontrol", "requeue", str(job_id))
    except BaseException:
        slurm_cluster.cancel(job_id)
        raise
    info, log = finish(slurm_cluster, job_id, out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert info["NumNodes"] == "1" and info["NumTasks"] == "2", info
    assert yaml.safe_load((out / "config.yaml").read_text())["parallel"]["ep_size"] == 2
    assert f"digits-rq-{job_id}.out" in {p.name for p in (out / "slurm").iterdir()}  # one log, named by job id
    assert "restart 1" in log and digits.steps(out)[-1] == 30 and digits.eval_result(out)["images"] > 0, log
    # SIGTERM: the ranks finish their step and checkpoint it, so the requeued job resumes where it stopped; in any
    # case no more than checkpoint_every steps may be lost
    stopped = [int(n) for n in re.findall(r"checkpointing at step (\d+) and exiting for requeue", log)]
    resumed = digits.resumed_at(log)
    assert stopped and resumed and stopped[0] >= seen, log
    assert 0 <= stopped[0] - resumed[0] <= every, (stopped, resumed)
