"""Which rank broke the job: after a collective failed or timed out, the surviving ranks check in at the rendezvous
store and name the ranks that did not.

A collective's own error names at most a socket address (gloo: "Connection closed by peer [10.0.0.7]:41233") or
nothing at all (a timeout), and every rank of a node shares one address. The rendezvous store (torchrun's agent, or
rank 0 under the deepspeed launcher and srun) outlives the collective, so each survivor writes its rank there,
waits a few seconds for the others, and reports the ranks missing. Nothing of this runs before a failure: the
training steps pay nothing for it.
"""

from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist


def check_in_wait_s(timeout_s: float) -> float:
    """How long survivors wait for each other: short next to the collective timeout, long enough for ranks that
    noticed the failure a little later (a dead peer closes one socket at a time)."""
    return min(10.0, max(2.0, 0.05 * timeout_s))


def missing_ranks(rank: int, world: int, wait_s: float, store=None) -> tuple[list[int] | None, str]:
    """Checks this rank in and returns (ranks that did not check in within `wait_s`, note).

    `store` defaults to the default process group's. The list is None when the store itself cannot be reached; the
    note then says who hosts it (a dead store host is the likely culprit).
    """
    if world <= 1:
        return [], ""
    if store is None:
        try:
            from torch.distributed import distributed_c10d as c10d

            store = c10d._get_default_store()
        except Exception as e:  # no process group, or a torch without the accessor
            return None, f"no rendezvous store to ask ({type(e).__name__})"
    prefix = f"vimoe/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1.0)))
        store.set(f"{prefix}{rank}", "1")
        count = store.add(f"{prefix}count", 1)
        deadline = time.monotonic() + wait_s
        while count < world and time.monotonic() < deadline:
            time.sleep(0.2)
            count = store.add(f"{prefix}count", 0)
    except Exception:
        return None, _store_host_note()
    missing = []
    for r in range(world):
        try:
            present = store.check([f"{prefix}{r}"])
        except Exception:
            return (missing or None), _store_host_note()
        if not present:
            missing.append(r)
    return missing, ""


def _store_host_note() -> str:
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return "the rendezvous store (torchrun's agent) did not answer"
    return "the rendezvous store did not answer; it lives in rank 0, which is then the likely culprit"


def describe_failure(rank: int, world: int, timeout_s: float, error: BaseException) -> str:
    """One line for the log: which ranks are missing (or why that is unknown) and the collective's own error."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    missing, note = missing_ranks(rank, world, check_in_wait_s(timeout_s))
    if missing:
        who = f"rank {missing[0]}" if len(missing) == 1 else "ranks " + ", ".join(map(str, missing))
        cause = f"{who} did not answer (dead or hung)"
    elif missing is None:
        cause = f"the failed rank is unknown: {note}"
    else:
        cause = "every rank checked in, so none is dead; a peer may have timed out waiting for this one (see its log)"
    return (
        f"rank {rank}: a collective failed or timed out (parallel.timeout_s={timeout_s:g}): {cause}. "
        f"{type(error).__name__}: {first[:300]}"
    )


def is_collective_failure(e: BaseException) -> bool:
    """A failed or timed-out collective (gloo, NCCL, the store), as opposed to a bug or a user error."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))
