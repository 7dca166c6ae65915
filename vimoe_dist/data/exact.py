"""`data.order: exact`: the global batch at step s holds the same samples, augmented the same way, whatever the
number of nodes, ranks and workers (the elastic determinism of MosaicML's StreamingDataset).

Every sample has a global index (manifest order: shard by shard). Epoch e visits the samples in the permutation
`perm_e` of a generator seeded by (run.seed, e); global position p = s * global_batch + i maps to epoch p // N and
sample perm_e[p % N], so epochs roll over without dropping or repeating anything. Micro-batch a of rank r at step s
takes positions [(a * world + r) * b, +b) of that step's global batch: concatenated over (a, r) they are the global
batch in order. Augmentation draws from RNGs seeded by (run.seed, epoch, sample index), so a sample looks the same
wherever it is decoded. Samples are read by random access into local tars through an index of member offsets
(wids-style; webdataset 1.0 no longer ships `wids`, so the small index lives here). A bad sample is replaced by a
substitute chosen from its position alone, which keeps the replacement layout-invariant too.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from vimoe_dist.config import Config
from vimoe_dist.data.baddata import BadDataLog, BadSample, check_bad_fraction
from vimoe_dist.data.stream import worker_position
from vimoe_dist.data.tarformat import scan_members
from vimoe_dist.data.transforms import SampleDecoder, global_rng, seed_from, set_global_seed
from vimoe_dist.errors import UserError

MAX_SUBSTITUTES = 100  # a position whose first 100 substitutes are all bad stops the run
MAX_OPEN_INDEXES = 4096  # shard indexes kept per worker (an ImageNet-1k train set has about 1,000-2,000 shards)
_PERM, _SUB, _AUG = 0x7065726D, 0x737562, 0x617567


class TarIndex:
    """Sample groups of one local tar: the key and the (extension, offset, size) of every member, read once.

    Stored compactly (numpy arrays, members in CSR layout, extension names interned): about 70 bytes per sample
    instead of ~500 for Python dicts, which matters when every worker of every rank indexes an ImageNet.
    """

    def __init__(self, path: str) -> None:
        from webdataset.tariterators import base_plus_ext

        self.path = path
        self.error: str | None = None
        entries: list[tuple[str, int, int]] = []
        try:
            entries = scan_members(path)
        except tarfile.ReadError as e:  # keep the members before the damage
            entries = e.args[1] if len(e.args) > 1 else []
            self.error = f"ReadError: {e.args[0]}"[:200]
        except (OSError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"[:200]
        keys: list[str] = []
        starts: list[int] = []
        ext_ids: list[int] = []
        self.ext_names: list[str] = []
        intern: dict[str, int] = {}
        kept = []
        for name, offset, size in entries:
            if name.startswith("__"):
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if not keys or keys[-1] != prefix:
                keys.append(prefix)
                starts.append(len(kept))
            suffix = suffix.lower()
            if suffix not in intern:
                intern[suffix] = len(self.ext_names)
                self.ext_names.append(suffix)
            ext_ids.append(intern[suffix])
            kept.append((offset, size))
        self.keys = np.array([k.encode() for k in keys], dtype=np.bytes_) if keys else np.zeros(0, dtype="S1")
        self.starts = np.array([*starts, len(kept)], dtype=np.int64)
        self.offsets = np.array([o for o, _ in kept], dtype=np.int64)
        self.sizes = np.array([n for _, n in kept], dtype=np.int64)
        self.ext_ids = np.array(ext_ids, dtype=np.int16)
        self.size = _file_size(path)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> dict:
        """Sample i as a webdataset dict; members cut off by truncation are left out (the decoder flags them)."""
        sample = {"__key__": self.keys[i].decode("utf-8"), "__url__": self.path}
        with open(self.path, "rb") as f:
            for m in range(int(self.starts[i]), int(self.starts[i + 1])):
                offset, size = int(self.offsets[m]), int(self.sizes[m])
                if offset + size > self.size:
                    continue
                f.seek(offset)
                sample[self.ext_names[self.ext_ids[m]]] = f.read(size)
        return sample


def _file_size(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.seek(0, 2)
    except OSError:
        return 0


class ExactOrder:
    """Global position -> (epoch, sample index) for N samples; permutations cached per epoch."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed = num_samples, seed
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng(seed_from(self.seed, _PERM, epoch))
            self._perms[epoch] = rng.permutation(self.num_samples)
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def sample_at(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.num_samples)
        return epoch, int(self.permutation(epoch)[offset])


class ExactBatches(Dataset):
    """Micro-batch k of one rank -> {image, label, num_bad, index, key}; `index`: global sample indices."""

    def __init__(
        self,
        cfg: Config,
        urls: list[str],
        counts: list[int],
        rank: int,
        world_size: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.counts = cfg, urls, counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.accum = cfg.train.grad_accum
        self.global_batch = cfg.train.global_batch_size
        self.order = ExactOrder(int(self.offsets[-1]), cfg.run.seed)
        self._indexes: OrderedDict[int, TarIndex] = OrderedDict()
        self._decoder: SampleDecoder | None = None
        self._bad: BadDataLog | None = None
        self._num_good = 0

    def positions(self, k: int) -> range:
        """Global sample positions of this rank's micro-batch k."""
        step, micro = divmod(k, self.accum)
        first = step * self.global_batch + (micro * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def __getitem__(self, k: int) -> dict:
        if self._decoder is None:
            worker, _ = worker_position()
            self._decoder = SampleDecoder(self.cfg, training=True)
            self._bad = BadDataLog(f"data.train (exact) rank {self.rank} worker {worker}")
        images, labels, indices, keys = [], [], [], []
        with global_rng():  # per-sample seeds below; the caller's RNGs come back untouched
            for position in self.positions(k):
                image, label, index, key = self._load(position)
                images.append(image)
                labels.append(label)
                indices.append(index)
                keys.append(key)
        return {
            "image": default_collate(images),  # in a worker: stacked straight into shared memory
            "label": torch.tensor(labels, dtype=torch.long),
            "num_bad": self._bad.take(),
            "index": torch.tensor(indices, dtype=torch.long),
            "key": keys,
        }

    def _load(self, position: int) -> tuple[torch.Tensor, int, int, str]:
        epoch, index = self.order.sample_at(position)
        for attempt in range(MAX_SUBSTITUTES + 1):
            if attempt:
                rng = np.random.default_rng(seed_from(self.cfg.run.seed, _SUB, position, attempt))
                index = int(rng.integers(self.order.num_samples))
            try:
                sample = self._read(index)
                label = self._decoder.label(sample)
                image = self._decoder.image(sample)
                set_global_seed(seed_from(self.cfg.run.seed, _AUG, epoch, index))
                image = self._decoder.augment(sample, image)
            except BadSample as e:
                self._bad.record(e.shard, e.key, e.reason)
                check_bad_fraction(
                    self._bad.num_bad, self._num_good + self._bad.num_bad, self.cfg.data.max_bad_fraction,
                    self._bad.where,
                )  # fmt: skip
                continue
            self._num_good += 1
            return image, label, index, sample["__key__"]
        raise UserError(f"data.train: position {position}: {MAX_SUBSTITUTES} substitutes in a row were bad")

    def _read(self, index: int) -> dict:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        tar = self._index(shard)
        local = index - int(self.offsets[shard])
        if local >= len(tar):
            reason = f"unreadable shard ({tar.error})" if tar.error else "shard holds fewer samples than its manifest"
            raise BadSample(tar.path, f"#{local}", reason)
        return tar.read(local)

    def _index(self, shard: int) -> TarIndex:
        tar = self._indexes.get(shard)
        if tar is None:
            tar = self._indexes[shard] = TarIndex(self.urls[shard])
            if len(tar) > self.counts[shard]:
                raise UserError(
                    f"data.train: shard {tar.path!r} holds {len(tar)} samples, more than its manifest says "
                    f"({self.counts[shard]}); rewrite the manifest with `vimoe data manifest`"
                )
        self._indexes.move_to_end(shard)
        while len(self._indexes) > MAX_OPEN_INDEXES:
            self._indexes.popitem(last=False)
        return tar


class CountFrom(Sampler):
    """k, k+1, k+2, ... forever: the micro-batch indices of an endless exact-order loader."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1
