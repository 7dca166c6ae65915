"""The sequential paths (`data.order: stream`): the endless training stream and the exactly-once validation stream.

Training (one copy per DataLoader worker): the shard list is split by rank and then by worker (webdataset's
`split_by_node` / `split_by_worker` rule, `islice(urls, i, None, n)`, with rank and world size passed in rather
than read from torch.distributed), the worker's shards are resampled forever by webdataset's `ResampledShards`
with a seed from (run.seed, rank, worker, start step), samples pass a shuffle buffer (webdataset's `_shuffle`) and
are decoded, augmented and batched in the worker. The stream never ends, so every rank yields batches in lockstep
(an epoch-bounded stream that runs dry on one rank hangs the collectives of the others; webdataset issue #188).

Validation: the manifest's sample counts give each (rank, worker) a contiguous range of global sample positions;
a worker reads only the shards overlapping its range and yields ceil(n / b) batches, the last one padded with
`valid=False`. The loader pads every rank to the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from vimoe_dist.config import Config
from vimoe_dist.data.baddata import BadDataLog, BadSample, check_bad_fraction
from vimoe_dist.data.tario import ShardReader, account_shard_end
from vimoe_dist.data.transforms import SampleDecoder, global_rng, seed_from, set_global_seed
from vimoe_dist.errors import UserError

# a worker that reads this many shards in a row without one sample stops the run instead of spinning forever
MAX_EMPTY_SHARDS = 16


def worker_position() -> tuple[int, int]:
    """(worker id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def shards_for(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards of one (rank, worker): by node, then by worker, as webdataset's splitters do."""
    return urls[rank::world_size][worker::num_workers]


class TrainStream(IterableDataset):
    """Endless batches {image, label, num_bad, key} for one rank; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        urls: list[str],
        counts: dict[str, int] | None,
        rank: int,
        world_size: int,
        batch_size: int,
        start_step: int,
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.counts = cfg, urls, counts or {}
        self.rank, self.world_size, self.batch_size, self.start_step = rank, world_size, batch_size, start_step

    def __iter__(self) -> Iterator[dict]:
        from webdataset.filters import _shuffle
        from webdataset.shardlists import ResampledShards

        worker, num_workers = worker_position()
        where = f"data.train rank {self.rank} worker {worker}"
        shards = shards_for(self.urls, self.rank, self.world_size, worker, num_workers)
        seed = seed_from(self.cfg.run.seed, self.rank, worker, self.start_step)
        resampled = ResampledShards(shards, seed=seed, worker_seed=lambda: 0, deterministic=True)
        bad = BadDataLog(where)
        samples = self._samples(iter(resampled), bad, where)
        buffer = self.cfg.data.shuffle_buffer
        if buffer > 1:
            import random

            samples = _shuffle(samples, bufsize=buffer, initial=min(100, buffer), rng=random.Random(seed))
        decoder = SampleDecoder(self.cfg, training=True)
        num_good = 0
        rng_state = None
        in_worker = get_worker_info() is not None
        if in_worker:  # the worker process's global RNGs are this stream's alone
            set_global_seed(seed)
        while True:
            images, labels, keys = [], [], []
            # timm's transforms draw from the global RNGs; in the main process they are the trainer's, so the stream
            # brings its own state in for each batch and takes it out again
            with nullcontext({}) if in_worker else global_rng(seed=seed, state=rng_state) as rng_out:
                while len(images) < self.batch_size:
                    sample = next(samples)
                    try:
                        image, label = decoder(sample)
                    except BadSample as e:
                        bad.record(e.shard, e.key, e.reason)
                        check_bad_fraction(bad.num_bad, num_good + bad.num_bad, self.cfg.data.max_bad_fraction, where)
                        continue
                    images.append(image)
                    labels.append(label)
                    keys.append(sample["__key__"])
                    num_good += 1
            rng_state = rng_out
            check_bad_fraction(bad.num_bad, num_good + bad.num_bad, self.cfg.data.max_bad_fraction, where)
            yield {
                "image": default_collate(images),  # in a worker: stacked straight into shared memory
                "label": torch.tensor(labels, dtype=torch.long),
                "num_bad": bad.take(),
                "key": keys,
            }

    def _samples(self, shard_iter: Iterator[dict], bad: BadDataLog, where: str) -> Iterator[dict]:
        empty_in_a_row = 0
        for item in shard_iter:
            url = item["url"]
            reader = ShardReader(url, self.cfg.data.http_timeout_s)
            yield from reader
            account_shard_end(reader, bad, self.counts.get(url))
            empty_in_a_row = 0 if reader.num_seen else empty_in_a_row + 1
            if empty_in_a_row >= MAX_EMPTY_SHARDS:
                last = f"{url!r}: {reader.error or 'empty'}"
                raise UserError(f"{where}: {empty_in_a_row} shards in a row gave no samples (last {last})")


def split_range(lo: int, hi: int, parts: int, index: int) -> tuple[int, int]:
    n = hi - lo
    return lo + n * index // parts, lo + n * (index + 1) // parts


def val_ranges(num_samples: int, world_size: int, num_workers: int) -> list[list[tuple[int, int]]]:
    """[rank][worker] -> (first, end) global sample positions; contiguous, disjoint, covering everything."""
    return [
        [split_range(*split_range(0, num_samples, world_size, r), num_workers, w) for w in range(num_workers)]
        for r in range(world_size)
    ]


def num_val_batches(num_samples: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Batches every rank yields: the most any rank needs (each worker pads its own last batch)."""
    ranges = val_ranges(num_samples, world_size, num_workers)
    return max(sum(math.ceil((hi - lo) / batch_size) for lo, hi in rank) for rank in ranges)


class ValStream(IterableDataset):
    """Batches {image, label, valid, num_bad, key} of one (rank, worker) range of the validation set."""

    def __init__(
        self,
        cfg: Config,
        urls: list[str],
        counts: list[int],
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.counts = cfg, urls, counts
        self.rank, self.world_size, self.batch_size, self.num_workers = rank, world_size, batch_size, num_workers
        self.image_shape = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_position()
        where = f"data.val rank {self.rank} worker {worker}"
        lo, hi = val_ranges(sum(self.counts), self.world_size, max(self.num_workers, 1))[self.rank][worker]
        bad = BadDataLog(where)
        decoder = SampleDecoder(self.cfg, training=False)
        num_batches = math.ceil((hi - lo) / self.batch_size)
        images, labels, keys = [], [], []
        num_good = 0
        for sample in self._samples(lo, hi, bad, where):
            try:
                image, label = decoder(sample)
            except BadSample as e:
                bad.record(e.shard, e.key, e.reason)
                continue
            images.append(image)
            labels.append(label)
            keys.append(sample["__key__"])
            num_good += 1
            if len(images) == self.batch_size:
                yield self._batch(images, labels, keys, bad)
                images, labels, keys = [], [], []
                num_batches -= 1
        check_bad_fraction(bad.num_bad, num_good + bad.num_bad, self.cfg.data.max_bad_fraction, where, final=True)
        for _ in range(num_batches):  # bad samples leave holes: pad so that this worker's batch count is fixed
            yield self._batch(images, labels, keys, bad)
            images, labels, keys = [], [], []

    def _batch(self, images: list, labels: list, keys: list, bad: BadDataLog) -> dict:
        n, b = len(images), self.batch_size
        image = torch.zeros((b, *self.image_shape))
        if n:
            image[:n] = torch.stack(images)
        label = torch.zeros(b, dtype=torch.long)
        label[:n] = torch.tensor(labels, dtype=torch.long)
        valid = torch.zeros(b, dtype=torch.bool)
        valid[:n] = True
        keys = keys + [""] * (b - n)
        return {"image": image, "label": label, "valid": valid, "num_bad": bad.take(), "key": keys}

    def _samples(self, lo: int, hi: int, bad: BadDataLog, where: str) -> Iterator[dict]:
        start = 0
        for url, count in zip(self.urls, self.counts):
            end = start + count
            if end > lo and start < hi:
                first, last = max(lo, start), min(hi, end)
                reader = ShardReader(url, self.cfg.data.http_timeout_s)
                position, num_in_range = start, 0
                for sample in reader:
                    if position >= end:
                        raise UserError(f"{where}: shard {url!r} holds more samples than its manifest says ({count})")
                    if first <= position < last:
                        num_in_range += 1
                        yield sample
                    position += 1
                    if position >= last and last < end:
                        break  # the rest of this shard belongs to the next worker
                if reader.partial_key is not None and first <= position < last:
                    num_in_range += 1
                    bad.record(url, reader.partial_key, f"unreadable shard ({reader.error}); sample cut off")
                missing = (last - first) - num_in_range
                if missing > 0:
                    reason = f"unreadable shard ({reader.error})" if reader.error else "shard ended early"
                    bad.record(url, "-", f"{reason}; {missing} samples lost", missing)
            start = end
