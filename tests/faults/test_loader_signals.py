"""DataLoader workers survive the preemption signals that torchrun and Slurm send to a rank's whole process group.

Without this the worker dies of SIGTERM ("DataLoader worker killed") and takes the rank with it before it can
checkpoint. Real worker processes, real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from support import children

from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_workers_ignore_stop_signals(digits_dir, sig):
    cfg = load_config(
        None,
        [
            f"data.train={digits_dir}/train-{{000000..000011}}.tar",
            "model.img_size=8",
            "model.num_classes=10",
            "model.moe.group_size=4",
            "train.global_batch_size=8",
            "data.order=exact",
            "data.num_workers=2",
        ],
    )
    before = set(children(os.getpid()))
    batches = iter(build_train_loader(cfg, 0, 1))
    first = next(batches)
    workers = [p for p in children(os.getpid()) if p not in before]
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, sig)
    time.sleep(0.5)
    # the workers are alive and keep producing batches
    for pid in workers:
        os.kill(pid, 0)
    later = [next(batches) for _ in range(4)]
    assert all(b["image"].shape == first["image"].shape for b in later)
    del batches


def test_exit_does_not_wait_for_workers_that_outlive_their_loader(digits_dir):
    """A worker ignores SIGTERM, so multiprocessing's exit hook (SIGTERM, then join) would wait for it forever.
    The reaper must find it even when the loader is gone and only torch's iterator survives (what a UserError from
    `next()` does through its `__context__`; `make test` once hung for 90 minutes after its last test on that)."""
    script = f"""
import gc
from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader
cfg = load_config(None, ["data.train={digits_dir}/train-{{000000..000011}}.tar", "model.img_size=8",
                         "model.num_classes=10", "model.moe.group_size=4", "train.global_batch_size=8",
                         "data.num_workers=1"])
train = build_train_loader(cfg, 0, 1)
batches = iter(train)
next(batches)
survivor = train._it  # torch's iterator, holding the live worker
del batches, train
gc.collect()
print("exiting", flush=True)
"""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr[-2000:]
    assert time.monotonic() - start < 60
