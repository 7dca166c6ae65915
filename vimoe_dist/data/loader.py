"""The loaders the trainer calls: `build_train_loader` (endless, resumable) and `build_val_loader` (every sample
once, the same number of batches on every rank).

    train = build_train_loader(cfg, rank, world_size, start_step=s, state=checkpoint.get("data"))
    for batch in train:  # ["image"] [b, C, H, W], ["label"] [b], ["num_bad"] int, ["key"] list[str],
        ...              # ["target"] [b, num_classes] with mixup/cutmix; exact order adds ["index"] [b]
    checkpoint["data"] = train.state_dict()

    for batch in build_val_loader(cfg, rank, world_size):
        batch["image"], batch["label"], batch["valid"], batch["num_bad"], batch["key"]  # padding: valid False, key ""

b = train.global_batch_size / (world_size x train.grad_accum) and must be a multiple of model.moe.group_size
(routing groups never straddle a batch). Every forward of an expert-parallel model is a collective, so both
loaders yield the same number of batches on every rank: the training stream never ends, the validation loader pads
with `valid=False` batches.

Resume: in exact order (the default) the data position is the step, so a resumed run (on any number of ranks)
gets the very batches it would have had, at no cost that grows with the position (`vimoe bench data` measures it).
In stream order (http(s) shards, compressed tars, raw throughput) shard resampling and the shuffle buffer are
reseeded from (run.seed, rank, worker, start_step): the resumed stream is fresh data from the same distribution,
not a replay (a streaming shuffle buffer has no cheap exact position to save, and per-worker positions would not
survive a change in the number of ranks anyway).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util  # noqa: F401  (its exit hook must be registered before ours, see _reap_workers)
import signal
import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from vimoe_dist.config import Config, micro_batch_size
from vimoe_dist.data.splits import resolve_split
from vimoe_dist.errors import UserError

log = logging.getLogger("vimoe_dist.data")
STATE_VERSION = 1


def _loader(dataset, cfg: Config, sampler=None) -> DataLoader:
    workers = cfg.data.num_workers
    return _DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=cfg.data.prefetch if workers else None,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals if workers else None,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals (SIGTERM, SIGUSR1).

    torchrun and Slurm signal a rank's whole process group, workers included. Torch's worker handler would let
    SIGTERM kill the worker, and the rank would die with "DataLoader worker killed" before it could save its
    checkpoint. The rank alone handles the request (train/signals.py); its workers stop with it, and exit by
    themselves when it dies (torch's parent watchdog).
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


_workers: weakref.WeakSet = weakref.WeakSet()  # every worker process our loaders started


class _DataLoader(DataLoader):
    """torch's DataLoader, remembering the worker processes of each iterator it creates (for `_reap_workers`)."""

    def __iter__(self):
        iterator = super().__iter__()
        _workers.update(getattr(iterator, "_workers", ()))  # none with num_workers=0
        return iterator


def _reap_workers() -> None:
    """At exit, SIGKILL the workers of our loaders that are still alive.

    multiprocessing's own exit hook ends daemonic children with SIGTERM and then joins them; our workers ignore
    SIGTERM (above), so a worker still alive at exit would hang the interpreter in that join forever. A worker
    outlives its loader more easily than one would think: a UserError raised from `next()` keeps torch's iterator
    (and its workers) alive through the exception's `__context__` after the loader itself is gone, so the workers
    are remembered themselves, not through their loaders. atexit runs hooks last-registered-first; this one is
    registered at import, after `multiprocessing.util` registered its hook, so it runs first.
    """
    alive = [w for w in list(_workers) if w.is_alive()]
    if not alive:
        return
    # torch's SIGCHLD handler would raise "DataLoader worker (pid N) is killed" for each worker we kill (atexit hooks
    # run in the main thread, where signal handlers may be set)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for w in alive:
        w.kill()
    for w in alive:
        w.join(timeout=5)


atexit.register(_reap_workers)


def _unwrap(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker arrives wrapped in its traceback; keep the one-line message."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return UserError(last.split(": ", 1)[1] if last.startswith(("vimoe_dist.", "UserError")) else last)


class TrainLoader:
    """Endless micro-batches of one rank; `state_dict()` is the data position to checkpoint."""

    def __init__(self, cfg: Config, rank: int, world_size: int, batch_size: int, start_step: int, loader, order: str):
        from vimoe_dist.data.mixing import GroupMixup

        self.cfg, self.rank, self.world_size, self.batch_size = cfg, rank, world_size, batch_size
        self.order = order
        self.start_step = start_step
        self.num_micro_batches = start_step * cfg.train.grad_accum
        self.num_bad = 0
        self.loader = loader
        self._it: Iterator | None = None
        self.mixup = GroupMixup(cfg) if cfg.data.mixup > 0 or cfg.data.cutmix > 0 else None

    def __iter__(self) -> Iterator[dict]:
        if self._it is None:
            self._it = iter(self.loader)
        while True:
            try:
                batch = next(self._it)
            except UserError as e:
                raise _unwrap(e) from None
            k = self.num_micro_batches
            if self.mixup is not None:
                batch["target"] = self.mixup(batch["image"], batch["label"], self.group_ids(k))
            self.num_micro_batches += 1
            self.num_bad += batch["num_bad"]
            yield batch

    def group_ids(self, k: int) -> list[int]:
        """Global ids of the routing groups in micro-batch k (position in the global sample sequence / group)."""
        t, group = self.cfg.train, self.cfg.model.moe.group_size
        step, micro = divmod(k, t.grad_accum)
        first = step * t.global_batch_size + (micro * self.world_size + self.rank) * self.batch_size
        return [(first + g * group) // group for g in range(self.batch_size // group)]

    @property
    def step(self) -> int:
        """Optimizer steps whose data this loader has handed out."""
        return self.num_micro_batches // self.cfg.train.grad_accum

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "order": self.order,
            "step": self.step,
            "micro_batches": self.num_micro_batches,
            "world_size": self.world_size,
            "seed": self.cfg.run.seed,
            "num_bad": self.num_bad,
        }


def build_train_loader(
    cfg: Config, rank: int, world_size: int, start_step: int = 0, state: dict | None = None
) -> TrainLoader:
    """The endless training loader of `rank`; from `start_step` on (a resumed run continues, never replays)."""
    from vimoe_dist.data.mixing import check_mixup

    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    b = micro_batch_size(cfg, world_size)
    check_mixup(cfg)
    order = cfg.data.order
    if state is not None and state.get("order", order) != order:
        log.warning("data.order changed from %s to %s on resume; the data position restarts at step %d",
                    state.get("order"), order, start_step)  # fmt: skip
    if order == "exact":
        from vimoe_dist.data.exact import CountFrom, ExactBatches

        urls, counts, _ = resolve_split(cfg, "data.train", need_counts=True)  # local tars only (splits.check_order)
        dataset = ExactBatches(cfg, urls, counts, rank, world_size, b)
        loader = _loader(dataset, cfg, sampler=CountFrom(start_step * cfg.train.grad_accum))
    else:
        from vimoe_dist.data.stream import TrainStream

        urls, counts, _ = resolve_split(cfg, "data.train", need_counts=False)
        workers = max(cfg.data.num_workers, 1)
        if len(urls) < world_size * workers:
            raise UserError(
                f"data.train: {len(urls)} shards for {world_size} ranks x {workers} workers; at least "
                f"{world_size * workers} shards are needed (write smaller shards, or lower data.num_workers)"
            )
        by_url = dict(zip(urls, counts)) if counts is not None else None
        dataset = TrainStream(cfg, urls, by_url, rank, world_size, b, start_step)
        loader = _loader(dataset, cfg)
    train = TrainLoader(cfg, rank, world_size, b, start_step, loader, order)
    if state is not None and state.get("world_size") == world_size:
        train.num_bad = int(state.get("num_bad", 0))
    return train


class ValLoader:
    """Validation batches of one rank; `len()` is the same on every rank."""

    def __init__(self, loader: DataLoader, num_batches: int, batch_size: int, image_shape: tuple[int, ...]) -> None:
        self.loader, self.num_batches, self.batch_size, self.image_shape = loader, num_batches, batch_size, image_shape

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        yielded = 0
        try:
            for batch in self.loader:
                yielded += 1
                if yielded > self.num_batches:  # an invariant of ValStream; a stray batch would hang the others
                    raise RuntimeError("validation stream yielded more batches than planned")
                yield batch
        except UserError as e:
            raise _unwrap(e) from None
        b = self.batch_size
        for _ in range(self.num_batches - yielded):
            yield {
                "image": torch.zeros((b, *self.image_shape)),
                "label": torch.zeros(b, dtype=torch.long),
                "valid": torch.zeros(b, dtype=torch.bool),
                "num_bad": 0,
                "key": [""] * b,
            }


def build_val_loader(cfg: Config, rank: int, world_size: int) -> ValLoader:
    """Every validation sample exactly once (valid=True) across ranks and workers; equal batch counts per rank."""
    from vimoe_dist.data.stream import ValStream, num_val_batches

    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    b = micro_batch_size(cfg, world_size)
    urls, counts, _ = resolve_split(cfg, "data.val", need_counts=True)
    workers = max(cfg.data.num_workers, 1)
    dataset = ValStream(cfg, urls, counts, rank, world_size, b, cfg.data.num_workers)
    num_batches = num_val_batches(sum(counts), world_size, workers, b)
    shape = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    return ValLoader(_loader(dataset, cfg), num_batches, b, shape)
