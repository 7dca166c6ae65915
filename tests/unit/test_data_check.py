"""Data sets by directory and `check_data`: the split's manifest names the shards; missing shards, shards whose size
differs from their manifest, classes that disagree between splits and manifests that cannot be true are one-line
errors naming the file; a pattern that names part of a data set is a warning with the counts."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader, build_val_loader, check_data, class_names, read_manifest, write_digits
from vimoe_dist.errors import UserError

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


@pytest.fixture
def copy(digits, tmp_path):
    """A private copy of the digits data set, free to damage."""
    shutil.copytree(digits, tmp_path / "d")
    return tmp_path / "d"


def make_cfg(train, val=None, *extra):
    return load_config(None, [f"data.train={train}", *([f"data.val={val}"] if val else []), "model.img_size=8",
                              "model.num_classes=10", "model.moe.group_size=1", "train.global_batch_size=8",
                              "data.num_workers=0", *extra])  # fmt: skip


def edit(path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_directory_names_its_splits_through_their_manifests(digits):
    cfg = make_cfg(digits, digits)
    summary = check_data(cfg)
    assert (summary.train.num_shards, summary.train.num_samples) == (12, 1437)
    assert (summary.val.num_shards, summary.val.num_samples) == (3, 360)
    assert summary.classes == DIGITS and summary.warnings == []
    assert summary.describe() == "data.train: 12 shards, 1,437 samples; data.val: 3 shards, 360 samples; 10 classes"
    assert class_names(cfg) == DIGITS
    # the loaders read the split's shards only (a glob of the directory's tars would mix train and val)
    assert sum(int(b["valid"].sum()) for b in build_val_loader(cfg, 0, 1)) == 360
    assert all(k.startswith("digit") for k in next(iter(build_train_loader(cfg, 0, 1)))["key"])
    # a manifest file names its split just the same
    assert check_data(make_cfg(digits / "train.json", digits / "val.json")).describe() == summary.describe()


def test_a_pattern_that_names_part_of_a_data_set_is_a_warning_with_the_counts(digits, caplog):
    caplog.set_level(logging.WARNING)
    summary = check_data(make_cfg(f"{digits}/train-{{000000..000009}}.tar", f"{digits}/val-{{000000..000002}}.tar"))
    assert summary.train.num_shards == 10 and summary.train.num_samples == 1200
    assert len(summary.warnings) == 1
    assert "data.train: the shards named cover 10 of the 12 shards of" in summary.warnings[0]
    assert "(1200 of 1437 samples)" in summary.warnings[0] and summary.warnings[0] in caplog.text
    with pytest.raises(UserError, match=r"train-000012.tar' \(from .*\) does not exist"):
        check_data(make_cfg(f"{digits}/train-{{000000..000012}}.tar"))


def test_missing_and_resized_shards_are_one_line_naming_them(copy):
    (copy / "train-000003.tar").unlink()
    with pytest.raises(UserError) as info:
        check_data(make_cfg(copy, copy))
    assert "data.train: shard" in one_line(info) and "train-000003.tar' (listed in" in one_line(info)
    shutil.copy(copy / "train-000004.tar", copy / "train-000003.tar")
    with open(copy / "train-000003.tar", "ab") as f:  # a shard replaced by another one, of another size
        f.write(bytes(10240))
    with pytest.raises(UserError) as info:
        check_data(make_cfg(copy, copy))
    assert "train-000003.tar' is " in one_line(info) and "train.json' says" in one_line(info)
    with pytest.raises(UserError, match=r"train-000003\.tar' is "):  # named by a pattern, checked all the same
        check_data(make_cfg(f"{copy}/train-{{000000..000011}}.tar"))


def test_a_directory_without_manifest_is_one_line(copy, tmp_path):
    (copy / "val.json").unlink()
    with pytest.raises(UserError) as info:
        check_data(make_cfg(copy, copy))
    assert one_line(info).startswith(f"data.val: '{copy}' has no val manifest (val.json)")
    with pytest.raises(UserError, match=r"data\.train: no training data"):
        check_data(make_cfg(""))


def test_classes_that_disagree_between_splits_are_one_line(copy):
    edit(copy / "val.json", lambda m: m.update(classes=DIGITS[::-1]))
    with pytest.raises(UserError) as info:
        check_data(make_cfg(copy, copy))
    assert one_line(info).startswith(f"data.val: '{copy / 'val.json'}' and '{copy / 'train.json'}' name different")
    assert "class 0 is '9' against '0'" in one_line(info)


def test_a_val_class_the_train_split_lacks_is_one_line(copy):
    def drop_nines(m):
        m["label_counts"][9] = 0

    edit(copy / "train.json", drop_nines)
    with pytest.raises(UserError) as info:
        check_data(make_cfg(copy, copy))
    assert "samples of class 9 '9', which the train split" in one_line(info)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m["shards"][0].update(num_samples=-100), "num_samples: -100 is not a count >= 0"),
        (lambda m: m["shards"][0].update(num_samples=2**40), f"claims {2**40} samples; its"),
        (lambda m: m["shards"][0].update(num_samples=2**40, num_bytes=0), "at most 16777216 per shard"),
        (lambda m: m["shards"][0].update(num_samples=True), "num_samples: True is not a count"),
        (lambda m: m["shards"][0].update(num_samples=1.5), "num_samples: 1.5 is not a count"),
        (lambda m: m["shards"][0].update(num_bytes=-1), "num_bytes: -1 is not a count"),
        (lambda m: m.update(num_samples=5), "num_samples 5 is not the sum over its shards"),
        (lambda m: m.update(classes=["a\nb", *DIGITS[1:]]), "class name 'a\\nb' holds a line break"),
        (lambda m: m.update(label_counts=[10**6] * 10), "label_counts add up to more than"),
        (lambda m: m.update(shards="x"), "'shards' must be a list"),
        (lambda m: m["shards"][0].update(url="pipe:touch /tmp/x"), "runs a shell command"),
    ],
)
def test_a_manifest_that_cannot_be_true_is_one_line(copy, change, expected):
    edit(copy / "train.json", change)
    with pytest.raises(UserError) as info:
        check_data(make_cfg(copy))
    assert expected in one_line(info) and "train.json" in one_line(info)


def test_a_negative_count_never_reaches_the_exact_order(copy):
    """-100 samples used to give duplicate samples in exact order; now the manifest is refused when read."""
    edit(copy / "train.json", lambda m: m["shards"][1].update(num_samples=-100))
    with pytest.raises(UserError, match="is not a count >= 0"):
        read_manifest(copy / "train.json")
    with pytest.raises(UserError, match="is not a count >= 0"):
        build_train_loader(make_cfg(f"{copy}/train-{{000000..000011}}.tar", None, "data.order=exact"), 0, 1)


def test_class_names_need_a_manifest_that_fits_the_model(digits, tmp_path):
    assert class_names(make_cfg(digits, None, "model.num_classes=12")) is None
    shutil.copy(digits / "val-000000.tar", tmp_path / "val-000000.tar")  # shards without a manifest
    assert class_names(make_cfg(tmp_path / "val-000000.tar")) is None
    assert class_names(make_cfg(tmp_path / "val-000000.tar", digits)) == DIGITS
