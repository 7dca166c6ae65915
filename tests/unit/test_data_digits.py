"""The digits writer: a fixed stratified split, readable shards, counts that match the manifest."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vimoe_dist.data import read_manifest, write_digits
from vimoe_dist.data.digits import digits_splits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def _read_split(out, manifest):
    keys, labels = [], []
    for shard in manifest.shards:
        with tarfile.open(out / shard.url) as tar:
            names = tar.getnames()
            assert len(names) == 2 * shard.num_samples
            for name in names:
                data = tar.extractfile(name).read()
                if name.endswith(".cls"):
                    keys.append(name[: -len(".cls")])
                    labels.append(int(data))
                else:
                    img = Image.open(io.BytesIO(data))
                    assert img.size == (8, 8) and img.mode == "L"
    return keys, labels


def test_digits_split_is_stratified_fixed_and_disjoint():
    splits = digits_splits()
    train, val = splits["train"], splits["val"]
    assert len(train.labels) + len(val.labels) == 1797
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    # stratified: every class is within one sample of 20% in val
    for c in range(10):
        total = (train.labels == c).sum() + (val.labels == c).sum()
        assert abs((val.labels == c).sum() - 0.2 * total) <= 1
    # fixed: a second call gives the same split
    again = digits_splits()
    assert np.array_equal(again["val"].indices, val.indices)


def test_digits_shards_match_manifest(digits_dir):
    splits = digits_splits()
    for name in ("train", "val"):
        manifest = read_manifest(digits_dir / f"{name}.json")
        keys, labels = _read_split(digits_dir, manifest)
        assert manifest.num_samples == len(keys) == len(splits[name].labels)
        assert len(set(keys)) == len(keys)
        assert labels == splits[name].labels.tolist()
        assert manifest.label_counts == np.bincount(labels, minlength=10).tolist()
        assert manifest.classes == [str(i) for i in range(10)]
    assert len(read_manifest(digits_dir / "train.json").shards) == 12


def test_digits_tars_are_reproducible(digits_dir, tmp_path):
    write_digits(tmp_path)
    for name in ("train-000000.tar", "val-000002.tar"):
        a = hashlib.sha256((digits_dir / name).read_bytes()).hexdigest()
        b = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert a == b
