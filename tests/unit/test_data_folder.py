"""ImageNet as people have it: the class-folder train split and the flat val split with its label file, written by
two `from-folder` calls into one data set whose splits share the class order; ImageNet's odd files included."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vimoe_dist.config import load_config
from vimoe_dist.data import build_val_loader, check_data, class_names, read_manifest
from vimoe_dist.data.folder import write_from_folder
from vimoe_dist.errors import UserError

WNIDS = ["n01440764", "n01443537", "n02085620"]  # sorted, like ImageNet's synsets


def image(seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (10 + seed % 7, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def imagenet(root):
    """root/train/<wnid>/<wnid>_<i>.JPEG (one CMYK JPEG, one PNG named .JPEG, one grayscale JPEG among them) and
    root/val/ILSVRC2012_val_<i>.JPEG, flat, with LOC_val_solution.csv (Kaggle's layout), a plain file,label CSV
    listing the files in another order and Caffe's val.txt (file and class index)."""
    odd = {(0, 1): ("JPEG", "CMYK"), (1, 0): ("PNG", "RGB"), (2, 2): ("JPEG", "L")}
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            fmt, mode = odd.get((c, i), ("JPEG", "RGB"))
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(image(10 * c + i, fmt, mode))
    (root / "val").mkdir()
    truth = {}
    for i in range(1, 7):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        truth[name] = WNIDS[(i * 2) % 3]
        (root / "val" / name).write_bytes(image(100 + i, "PNG" if i == 3 else "JPEG"))
    kaggle = ["ImageId,PredictionString"] + [f"{n[:-5]},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in truth.items()]
    (root / "LOC_val_solution.csv").write_text("\n".join(kaggle) + "\n")
    (root / "val.csv").write_text("".join(f"{n},{w}\n" for n, w in reversed(truth.items())))
    (root / "val.txt").write_text("".join(f"{n} {WNIDS.index(w)}\n" for n, w in truth.items()))  # Caffe's
    return truth


def shard_samples(out, split):
    samples = {}
    for shard in read_manifest(out / f"{split}.json").shards:
        with tarfile.open(out / shard.url) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def make_cfg(out, *extra):
    return load_config(None, [f"data.train={out}", f"data.val={out}", "model.num_classes=3", "model.img_size=8",
                              "model.moe.group_size=1", "train.global_batch_size=2", "data.num_workers=0",
                              *extra])  # fmt: skip


@pytest.mark.parametrize("label_file", ["LOC_val_solution.csv", "val.csv", "val.txt"])
def test_train_folders_and_flat_val_with_labels_make_one_data_set(tmp_path, label_file):
    truth = imagenet(tmp_path / "in")
    out = tmp_path / "wds"
    write_from_folder(tmp_path / "in" / "train", out, split="train", max_count=5, num_procs=2, progress=False)
    write_from_folder(tmp_path / "in" / "val", out, split="val", labels=tmp_path / "in" / label_file, progress=False)
    assert (out / "classes.txt").read_text() == "".join(f"{w}\n" for w in WNIDS)
    assert read_manifest(out / "train.json").classes == read_manifest(out / "val.json").classes == WNIDS
    val = shard_samples(out, "val")
    assert {k: WNIDS[int(s["cls"])] for k, s in val.items()} == {n[:-5]: w for n, w in truth.items()}
    assert "png" in val["ILSVRC2012_val_00000003"]  # stored as what it is, not as its name says
    train = shard_samples(out, "train")
    assert len(train) == 12 and "png" in train["n01443537/n01443537_0"]
    cfg = make_cfg(out)
    assert check_data(cfg).describe() == "data.train: 3 shards, 12 samples; data.val: 1 shards, 6 samples; 3 classes"
    assert class_names(cfg) == WNIDS
    batches = list(build_val_loader(make_cfg(out, "data.max_bad_fraction=0"), 0, 1))
    assert sum(int(b["valid"].sum()) for b in batches) == 6 and sum(b["num_bad"] for b in batches) == 0


def test_the_odd_train_files_decode_through_the_loader(tmp_path):
    """The train split read back as validation data: the CMYK, PNG-as-JPEG and grayscale files all decode."""
    imagenet(tmp_path / "in")
    out = tmp_path / "wds"
    write_from_folder(tmp_path / "in", out, labels=tmp_path / "in" / "val.csv", progress=False)
    cfg = make_cfg(out, f"data.val={out}/train.json", "data.max_bad_fraction=0")
    batches = list(build_val_loader(cfg, 0, 1))
    assert sum(int(b["valid"].sum()) for b in batches) == 12 and sum(b["num_bad"] for b in batches) == 0


def test_val_class_folders_take_the_train_order(tmp_path):
    imagenet(tmp_path / "in")
    for i, wnid in enumerate(reversed(WNIDS)):  # a preparation script's class folders, created in another order
        (tmp_path / "valdirs" / wnid).mkdir(parents=True)
        (tmp_path / "valdirs" / wnid / "a.JPEG").write_bytes(image(200 + i))
    out = tmp_path / "wds"
    write_from_folder(tmp_path / "valdirs", out, split="val", classes_from=tmp_path / "in" / "train", progress=False)
    val = shard_samples(out, "val")
    assert {k.split("/")[0]: WNIDS[int(s["cls"])] for k, s in val.items()} == {w: w for w in WNIDS}


def test_label_file_errors_are_one_line_naming_the_file(tmp_path):
    imagenet(tmp_path / "in")
    out, val = tmp_path / "wds", tmp_path / "in" / "val"
    write_from_folder(tmp_path / "in" / "train", out, split="train", progress=False)
    labels = tmp_path / "labels.csv"
    cases = [
        ("ILSVRC2012_val_00000099.JPEG,n01440764\n", "line 1: 'ILSVRC2012_val_00000099.JPEG' is not an image of"),
        ("ILSVRC2012_val_00000001.JPEG,n99999999\n", "line 1: label 'n99999999' is not one of the 3 classes"),
        ("ILSVRC2012_val_00000001.JPEG,n01440764\n", "labels.csv: 5 images have no line (first:"),
        ("ILSVRC2012_val_00000001.JPEG\n", "line 1: 'ILSVRC2012_val_00000001.JPEG' is not 'file,label'"),
    ]
    for text, expected in cases:
        labels.write_text(text)
        with pytest.raises(UserError) as info:
            write_from_folder(val, out, split="val", labels=labels, progress=False)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(UserError, match=r"no train split in .* --classes-from"):
        write_from_folder(val, tmp_path / "other", split="val", labels=labels, progress=False)
    with pytest.raises(UserError, match="images without class folders; give their label file with --labels"):
        write_from_folder(val, out, split="val", progress=False)
    assert read_manifest(out / "train.json").num_samples == 12 and not (out / "val.json").exists()
