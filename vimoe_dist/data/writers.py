"""Writing a split as WebDataset tar shards, reproducibly and with several processes.

The shard plan (which samples go to which shard) is fixed up front from the sorted sample list, `max_count` and the
known sample sizes, so the tars do not depend on how many writer processes ran or in which order they finished.
Each shard is written by webdataset's `TarWriter` with a fixed mtime, owner and mode (the tar headers are then a
pure function of the samples), first to a temporary name and then renamed, so a killed writer leaves no half shard
under a final name.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vimoe_dist.data.manifest import Manifest, ShardInfo, manifest_path

# 2000-01-01T00:00:00Z: any fixed value makes the tar headers reproducible
TAR_MTIME = 946684800
SHARD_PATTERN = "{split}-%06d.tar"
# per-file tar overhead: a 512-byte header plus padding to 512 bytes, two files (image, label) per sample
_TAR_OVERHEAD = 2 * 1024

SampleFn = Callable[[int], dict]


def plan_shards(num_items: int, max_count: int, sizes: Sequence[int] | None = None, max_size: float = 0) -> list[range]:
    """Consecutive item ranges, each with at most `max_count` items and (when sizes are known) at most `max_size`
    bytes, except that a single item larger than `max_size` gets a shard of its own."""
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    shards: list[range] = []
    start, size = 0, 0
    for i in range(num_items):
        item = (sizes[i] + _TAR_OVERHEAD) if sizes is not None else 0
        full = i - start >= max_count or (max_size > 0 and i > start and size + item > max_size)
        if full:
            shards.append(range(start, i))
            start, size = i, 0
        size += item
    if num_items > start:
        shards.append(range(start, num_items))
    return shards


def write_shard(path: str, items: range, sample_fn: SampleFn) -> tuple[int, int, dict[int, int]]:
    """Writes the samples `sample_fn(i)` for i in `items` to one tar; returns (samples, bytes, label counts)."""
    from webdataset.writer import TarWriter

    tmp = f"{path}.tmp{os.getpid()}"
    counts: dict[int, int] = {}
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=TAR_MTIME, user="vimoe", group="vimoe") as w:
        for i in items:
            sample = sample_fn(i)
            label = int(sample["cls"])
            sample["cls"] = str(label).encode("ascii")
            counts[label] = counts.get(label, 0) + 1
            w.write(sample)
    os.replace(tmp, path)
    return len(items), os.path.getsize(path), counts


def _write_shard_job(args: tuple[str, range, SampleFn]) -> tuple[int, int, dict[int, int]]:
    return write_shard(*args)


def _worker_signals() -> None:
    """Writer processes leave Ctrl-C to the parent (which stops the pool) and die of SIGTERM at once (a forked
    worker would otherwise inherit the parent's handler and carry on with the next shard)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    num_items: int,
    sample_fn: SampleFn,
    classes: Sequence[str],
    *,
    max_count: int = 1000,
    sizes: Sequence[int] | None = None,
    max_size: float = 0,
    num_procs: int = 1,
    source: str = "",
    progress: bool = True,
) -> Manifest:
    """Writes `DIR/<split>-%06d.tar` and `DIR/<split>.json`; `sample_fn(i)` returns a webdataset sample dict
    (`__key__`, image bytes under its extension, `cls` as an int) and must be picklable when `num_procs > 1`.

    Writes into `out_dir` itself: the public writers (digits, synthetic, from-folder) pass a `StagedWrite` folder,
    so that the data set a user named is replaced only when complete."""
    from vimoe_dist.data.progress import Progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{split}-*.tar"):  # a rewrite with fewer shards must not leave old ones matching
        stale.unlink()
    plan = plan_shards(num_items, max_count, sizes, max_size)
    names = [SHARD_PATTERN.format(split=split) % i for i in range(len(plan))]
    jobs = [(str(out / name), items, sample_fn) for name, items in zip(names, plan)]
    bar = Progress(num_items, f"{split} shards", enabled=progress)
    results = []
    if num_procs > 1 and len(jobs) > 1:
        # fork: the sample function and its data arrive without pickling; the parent holds no threads here
        ctx = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(max_workers=min(num_procs, len(jobs)), mp_context=ctx, initializer=_worker_signals)
        try:
            for result in pool.map(_write_shard_job, jobs):
                results.append(result)
                bar.update(result[0])
        except BaseException:
            # Ctrl-C or SIGTERM: no new shard starts; the running ones end before the caller removes the folder
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
    else:
        for job in jobs:
            results.append(write_shard(*job))
            bar.update(results[-1][0])
    bar.close()
    label_counts = [0] * len(classes)
    for _, _, counts in results:
        for label, n in counts.items():
            if not 0 <= label < len(classes):
                raise ValueError(f"{split}: label {label} outside the {len(classes)} classes")
            label_counts[label] += n
    manifest = Manifest(
        split=split,
        shards=[ShardInfo(name, n, size) for name, (n, size, _) in zip(names, results)],
        classes=list(classes),
        label_counts=label_counts,
        source=source,
    )
    manifest.write(manifest_path(out, split))
    return manifest
