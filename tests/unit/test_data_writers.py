"""The from-folder and synthetic writers on generated trees: exact placement, original bytes, reproducible tars."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vimoe_dist.data import read_manifest
from vimoe_dist.data.folder import write_from_folder
from vimoe_dist.data.synthetic import write_synthetic
from vimoe_dist.data.writers import plan_shards
from vimoe_dist.errors import UserError

CLASSES = ["ant", "bee", "cat"]


def make_tree(root, per_class=(5, 4, 6)):
    """SRC/{train,val}/<class>/ with JPEGs and PNGs of varied sizes (one with dots in its name)."""
    rng = np.random.default_rng(0)
    files = {}
    for split, scale in (("train", 1), ("val", 0)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class[c] if scale else 2):
                fmt, ext = ("PNG", "png") if i % 3 == 2 else ("JPEG", "jpg")
                stem = f"img.{i}.v2" if i == 1 else f"img{i}"
                size = int(rng.integers(8, 40))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
                (d / f"{stem}.{ext}").write_bytes(buf.getvalue())
                files[(split, buf.getvalue())] = c
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return files


def read_all(out, split):
    manifest = read_manifest(out / f"{split}.json")
    got = []
    for shard in manifest.shards:
        with tarfile.open(out / shard.url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = sorted({name.rsplit(".", 1)[0] for name in members})
        assert len(keys) == shard.num_samples
        for key in keys:
            image = next(v for n, v in members.items() if n.startswith(key + ".") and not n.endswith(".cls"))
            got.append((key, image, int(members[key + ".cls"])))
    return manifest, got


def test_from_folder_places_every_image_once_with_label_and_original_bytes(tmp_path):
    files = make_tree(tmp_path / "src")
    write_from_folder(tmp_path / "src", tmp_path / "out", max_count=4, num_procs=2, progress=False)
    assert (tmp_path / "out" / "classes.txt").read_text().split() == CLASSES
    for split, n in (("train", 15), ("val", 6)):
        manifest, got = read_all(tmp_path / "out", split)
        assert manifest.num_samples == n == len(got)
        assert len({key for key, _, _ in got}) == n
        assert sorted((image, label) for _, image, label in got) == sorted(
            (image, label) for (s, image), label in files.items() if s == split
        )
        assert manifest.classes == CLASSES
        assert sum(manifest.label_counts) == n
        assert all(s.num_samples <= 4 for s in manifest.shards)
    # the dotted file name kept one key (webdataset splits member names at the first dot)
    _, got = read_all(tmp_path / "out", "train")
    assert any(key.endswith("img_1_v2") for key, _, _ in got)


def test_from_folder_tars_do_not_depend_on_writer_processes(tmp_path):
    make_tree(tmp_path / "src")
    write_from_folder(tmp_path / "src", tmp_path / "a", max_count=4, num_procs=1, progress=False)
    write_from_folder(tmp_path / "src", tmp_path / "b", max_count=4, num_procs=3, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in "ab"]
        assert digest[0] == digest[1], name


def test_max_size_bounds_shards():
    plan = plan_shards(10, max_count=100, sizes=[1000] * 10, max_size=5000)
    assert [len(r) for r in plan] == [1] * 10  # 1000 bytes + tar headers: two would exceed 5000
    plan = plan_shards(10, max_count=100, sizes=[100] * 10, max_size=4 * (100 + 2048))
    assert [len(r) for r in plan] == [4, 4, 2]
    assert [len(r) for r in plan_shards(7, max_count=3)] == [3, 3, 1]


def test_from_folder_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="expected an ImageFolder tree"):
        write_from_folder(tmp_path, tmp_path / "out", progress=False)
    make_tree(tmp_path / "src")
    (tmp_path / "src" / "val" / "dog").mkdir()
    with pytest.raises(UserError, match="class 'dog' does not appear in the train split"):
        write_from_folder(tmp_path / "src", tmp_path / "out", progress=False)


def test_synthetic_is_balanced_jpeg_and_reproducible(tmp_path):
    write_synthetic(tmp_path / "a", num_classes=4, num_images=40, size=16, max_count=16, num_procs=2, progress=False)
    write_synthetic(tmp_path / "b", num_classes=4, num_images=40, size=16, max_count=16, progress=False)
    manifest, got = read_all(tmp_path / "a", "train")
    assert manifest.label_counts == [10, 10, 10, 10] and len(manifest.shards) == 3
    assert all(Image.open(io.BytesIO(image)).format == "JPEG" for _, image, _ in got)
    assert read_manifest(tmp_path / "a" / "val.json").num_samples == 4
    for name in ("train-000002.tar", "val-000000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
