"""The loaders with real DataLoader worker processes: validation sees every sample exactly once on 2 ranks x 2
workers; the training stream gives each (rank, worker) its own shards, repeats itself under the same seed and
keeps every rank in lockstep. The ranks of a layout run in this process, each with its own loader (a rank's loader
depends only on cfg, rank and world size)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tarfile
from collections import Counter

import pytest

from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader, build_val_loader, read_manifest, write_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def make_cfg(digits, *extra):
    return load_config(
        None,
        [
            f"data.train={digits}/train-{{000000..000011}}.tar",
            f"data.val={digits}/val-{{000000..000002}}.tar",
            "model.img_size=8",
            "model.num_classes=10",
            "model.moe.group_size=2",
            "train.global_batch_size=32",
            "data.num_workers=2",
            "data.shuffle_buffer=20",
            "data.order=stream",  # the training stream's worker split (the exact order's: test_data_exact.py)
            *extra,
        ],
    )


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_val_every_sample_exactly_once_on_ranks_x_two_workers(digits, world):
    cfg = make_cfg(digits)
    keys, batch_counts = Counter(), []
    for rank in range(world):
        loader = build_val_loader(cfg, rank, world)
        batches = list(loader)
        batch_counts.append(len(batches))
        for b in batches:
            keys.update(k for k, v in zip(b["key"], b["valid"].tolist()) if v)
            assert all(k == "" for k, v in zip(b["key"], b["valid"].tolist()) if not v)
        assert len(batches) == len(loader)
    assert len(set(batch_counts)) == 1
    assert len(keys) == read_manifest(digits / "val.json").num_samples == 360 and set(keys.values()) == {1}
    # a second pass over the same loader (persistent workers) gives the same samples again
    loader = build_val_loader(cfg, 0, world)
    first, second = ([k for b in loader for k in b["key"]] for _ in range(2))
    assert first == second


def digit_shard(digits):
    """key -> shard index, from the shards themselves."""
    where = {}
    for i in range(12):
        with tarfile.open(digits / f"train-{i:06d}.tar") as tar:
            for name in tar.getnames():
                where[name.split(".")[0]] = i
    return where


@pytest.mark.multiproc
def test_train_stream_with_workers(digits):
    cfg = make_cfg(digits)
    where = digit_shard(digits)
    shards, sequences = [], []
    for rank in range(2):
        batches = list(itertools.islice(iter(build_train_loader(cfg, rank, 2)), 40))
        assert len(batches) == 40 and all(len(b["key"]) == 16 for b in batches)
        sequences.append([b["key"] for b in batches])
        # DataLoader takes batches from workers in turn: even batches from worker 0, odd from worker 1
        per_worker = [{where[k] for b in batches[w::2] for k in b["key"]} for w in range(2)]
        assert per_worker[0].isdisjoint(per_worker[1])
        shards.append(per_worker[0] | per_worker[1])
        # split by node, then by worker; shards are resampled (with replacement) within each worker's own set
        assert per_worker[0] <= set(range(12)[rank::2][0::2]) and per_worker[1] <= set(range(12)[rank::2][1::2])
    assert shards[0].isdisjoint(shards[1])
    again = [b["key"] for b in itertools.islice(iter(build_train_loader(cfg, 0, 2)), 40)]
    assert again == sequences[0]


EXIT_SCRIPT = """
import sys
from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader
cfg = load_config(None, ["data.train={train}", "model.img_size=8", "model.num_classes=10", "model.moe.group_size=1",
                         "train.global_batch_size=8", "data.num_workers=2"])
loader = build_train_loader(cfg, 0, 1)
batches = iter(loader)
next(batches)
sys.modules["__main__"].kept = (loader, batches)  # still referenced when the interpreter exits
print("exiting", flush=True)
"""


@pytest.mark.multiproc
def test_interpreter_exits_with_loader_workers_alive(digits):
    """Workers ignore SIGTERM (preemption is the rank's business), so multiprocessing's exit hook cannot end them;
    ours must, or every process that still holds a loader at exit hangs forever."""
    script = EXIT_SCRIPT.format(train=f"{digits}/train-{{000000..000011}}.tar")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exiting" in proc.stdout and "Traceback" not in proc.stderr
