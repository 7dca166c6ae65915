"""The rendezvous port of a Slurm job, shared by the sbatch template and the ranks' own environment resolution.

Every task derives the same port from the job id without talking to the others first (dinov2's
`distributed/__init__.py` does the same). The range stays below Linux's ephemeral ports (32768-60999), so no
outgoing connection on the node already holds it, and a requeued job (same id) gets the same port back.
"""

from __future__ import annotations

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of Slurm job `job_id`, the same on every task and across requeues."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
