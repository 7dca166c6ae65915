"""The embedded default data set: scikit-learn's 1,797 handwritten 8x8 digits (UCI optdigits, 10 classes).

It ships inside scikit-learn, so the demo needs no download. The split is a fixed stratified 80/20 split
(`train_test_split(..., stratify=labels, random_state=0)`); pixels (0..16) are scaled to 0..255 and stored as
8-bit grayscale PNG, the labels as `.cls`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from vimoe_dist.data.manifest import Manifest
from vimoe_dist.data.staging import StagedWrite
from vimoe_dist.data.writers import write_split

DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2
DIGITS_SHARD_SIZE = 120  # 12 train shards: enough for 2 ranks x 4 workers (and 3 val shards)
DIGIT_CLASSES = [str(i) for i in range(10)]


@dataclass
class DigitsSplit:
    indices: np.ndarray  # positions in sklearn's load_digits() order
    images: np.ndarray  # [n, 8, 8] uint8
    labels: np.ndarray  # [n] int


def digits_splits() -> dict[str, DigitsSplit]:
    """The fixed stratified train/val split of `sklearn.datasets.load_digits`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        index, test_size=DIGITS_VAL_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return {name: DigitsSplit(idx, images[idx], labels[idx]) for name, idx in (("train", train_idx), ("val", val_idx))}


class _DigitSample:
    """Picklable sample function: position -> webdataset sample with a PNG image."""

    def __init__(self, split: DigitsSplit) -> None:
        self.split = split

    def __call__(self, i: int) -> dict:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.split.images[i], mode="L").save(buf, format="PNG")
        return {
            "__key__": f"digit{int(self.split.indices[i]):05d}",
            "png": buf.getvalue(),
            "cls": int(self.split.labels[i]),
        }


def write_digits(
    out_dir: str | os.PathLike, max_count: int = DIGITS_SHARD_SIZE, progress: bool = False
) -> dict[str, Manifest]:
    """Writes `out_dir/{train,val}-%06d.tar` and `out_dir/{train,val}.json`; returns the manifests by split."""
    splits = digits_splits()
    with StagedWrite(out_dir, list(splits)) as stage:
        return {
            name: write_split(
                stage.dir, name, len(split.labels), _DigitSample(split), DIGIT_CLASSES,
                max_count=max_count, source="sklearn.datasets.load_digits", progress=progress,
            )
            for name, split in splits.items()
        }  # fmt: skip
