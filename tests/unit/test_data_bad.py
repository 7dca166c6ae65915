"""Bad data and bad sources: corrupt images, truncated tars and missing labels are skipped and counted exactly;
past data.max_bad_fraction the run stops; sources that cannot work fail before training with one line."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import os
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader, build_val_loader, read_manifest, write_digits
from vimoe_dist.data.writers import write_split
from vimoe_dist.errors import UserError

CORRUPT, NO_LABEL = 3, 6  # positions of the bad samples in the damaged shard


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def damaged_sample(i: int) -> dict:
    sample = {"__key__": f"a{i:03d}", "jpg": jpeg(i), "cls": i % 4}
    if i == CORRUPT:
        sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]  # a JPEG cut in half: PIL fails on load
    return sample


def good_sample(i: int) -> dict:
    return {"__key__": f"b{i:03d}", "jpg": jpeg(100 + i), "cls": i % 4}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """bad-000000.tar: 10 samples, one corrupt JPEG and one without label; trunc-000000.tar: 10 samples, cut in
    the middle of sample 5's image (5 complete samples survive). The manifests keep the sample counts from before the
    damage and take the damaged sizes: the damage the readers must count is the kind a size check cannot see (a bad
    disk block inside a file, a shard that breaks after the start-up check)."""
    out = tmp_path_factory.mktemp("bad")
    write_split(out, "bad", 10, damaged_sample, ["0", "1", "2", "3"], max_count=10, progress=False)
    write_split(out, "trunc", 10, good_sample, ["0", "1", "2", "3"], max_count=10, progress=False)
    path = out / "bad-000000.tar"
    # drop the label member of sample NO_LABEL (rewrite the tar without it)
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m, data in members:
            if m.name != f"a{NO_LABEL:03d}.cls":
                dst.addfile(m, io.BytesIO(data))
    trunc = out / "trunc-000000.tar"
    with tarfile.open(trunc) as tar:
        cut = next(m for m in tar if m.name == "b005.jpg").offset_data + 100
    os.truncate(trunc, cut)
    for split in ("bad", "trunc"):
        manifest = read_manifest(out / f"{split}.json")
        manifest.shards[0].num_bytes = (out / f"{split}-000000.tar").stat().st_size
        manifest.write(out / f"{split}.json")
    return out


def make_cfg(train, val=None, *extra):
    return load_config(
        None,
        [
            f"data.train={train}",
            *([f"data.val={val}"] if val else []),
            "model.img_size=8",
            "model.num_classes=4",
            "model.moe.group_size=1",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "data.max_bad_fraction=0.5",
            "data.order=stream",  # the sequential reader; tests that need the exact order override it
            *extra,
        ],
    )


def val_totals(cfg, world):
    valid, bad, batches = 0, 0, []
    for rank in range(world):
        loader = list(build_val_loader(cfg, rank, world))
        batches.append(len(loader))
        valid += sum(int(b["valid"].sum()) for b in loader)
        bad += sum(b["num_bad"] for b in loader)
    assert len(set(batches)) == 1
    return valid, bad


@pytest.mark.parametrize("world", [1, 2, 4])
def test_val_counts_every_bad_sample_once(bad_dir, world):
    cfg = make_cfg(bad_dir / "bad-000000.tar", [str(bad_dir / "bad-000000.tar"), str(bad_dir / "trunc-000000.tar")],
                   "train.global_batch_size=4", "data.max_bad_fraction=1")  # fmt: skip
    # 8 good + 5 surviving; bad: corrupt JPEG, missing label, the cut-off sample and the 4 after it
    assert val_totals(cfg, world) == (13, 7)


def test_train_stream_skips_and_counts_corrupt_and_unlabelled(bad_dir, caplog):
    cfg = make_cfg(bad_dir / "bad-000000.tar", None, "train.global_batch_size=8")
    batches = list(itertools.islice(iter(build_train_loader(cfg, 0, 1)), 4))
    # one batch = one pass over the shard: 8 good samples, 2 bad
    assert [b["num_bad"] for b in batches] == [2, 2, 2, 2]
    assert all(len(b["key"]) == 8 and not {"a003", "a006"} & set(b["key"]) for b in batches)
    text = caplog.text
    assert "bad-000000.tar key a003: corrupt image" in text and "key a006: missing label" in text


def test_train_stream_counts_samples_lost_to_a_truncated_tar(bad_dir):
    cfg = make_cfg(bad_dir / "trunc-000000.tar", None, "train.global_batch_size=5")
    batches = list(itertools.islice(iter(build_train_loader(cfg, 0, 1)), 4))
    # batch 1 is the 5 surviving samples; each later batch first hits the cut (1 cut-off + 4 lost), then re-reads
    assert [b["num_bad"] for b in batches] == [0, 5, 5, 5]


def test_exact_order_substitutes_bad_samples(bad_dir):
    shards = [str(bad_dir / "bad-000000.tar"), str(bad_dir / "trunc-000000.tar")]
    cfg = make_cfg(shards, None, "data.order=exact", "train.global_batch_size=4")
    batches = list(itertools.islice(iter(build_train_loader(cfg, 0, 1)), 5))  # one epoch: 20 positions
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 20
    bad_keys = {"a003", "a006", "b005", "b006", "b007", "b008", "b009"}
    assert not bad_keys & set(keys)
    assert sum(b["num_bad"] for b in batches) >= 7  # every bad position counted (a substitute may be bad too)


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_samples_stop_with_one_line(bad_dir, workers):
    cfg = make_cfg(bad_dir / "bad-000000.tar", None, "train.global_batch_size=8", "data.max_bad_fraction=0.1",
                   f"data.num_workers={workers}")  # fmt: skip
    with pytest.raises(UserError) as info:
        for _ in itertools.islice(iter(build_train_loader(cfg, 0, 1)), 100):
            pass
    message = str(info.value)
    assert "\n" not in message and "data.max_bad_fraction=0.1" in message and "were bad (20.0%)" in message


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def test_one_line_errors_before_training(digits, tmp_path):
    def cfg(train, *extra):
        return make_cfg(train, None, "model.num_classes=10", "train.global_batch_size=8", *extra)

    with pytest.raises(UserError, match="no shards match"):
        build_train_loader(cfg(f"{tmp_path}/train-{{000000..000003}}.tar"), 0, 1)
    with pytest.raises(UserError, match=r"train-000012.tar' \(from .*\) does not exist"):
        build_train_loader(cfg(f"{digits}/train-{{000000..000012}}.tar"), 0, 1)
    os.mkfifo(tmp_path / "x-000000.tar")  # tests run as root, who reads any mode: a FIFO stands in for no permission
    with pytest.raises(UserError, match="is not a readable file"):
        build_train_loader(cfg(str(tmp_path / "x-000000.tar")), 0, 1)
    with pytest.raises(UserError, match=r"labels up to 9 but model.num_classes=5"):
        build_train_loader(cfg(f"{digits}/train-{{000000..000011}}.tar", "model.num_classes=5"), 0, 1)
    with pytest.raises(UserError, match="12 shards for 4 ranks x 4 workers; at least 16 shards are needed"):
        build_train_loader(cfg(f"{digits}/train-{{000000..000011}}.tar", "data.num_workers=4"), 0, 4)
    with pytest.raises(UserError, match=r"data\.val: no shards given"):
        build_val_loader(cfg(f"{digits}/train-000000.tar"), 0, 1)


def test_pipe_is_refused_unless_allowed(digits):
    pipes = [f"pipe:cat {digits}/train-{i:06d}.tar" for i in range(12)]
    val = [f"pipe:cat {digits}/val-{i:06d}.tar" for i in range(3)]
    base = ("model.num_classes=10", "train.global_batch_size=8")
    with pytest.raises(UserError, match=r"runs a shell command; set data\.allow_pipe=true"):
        build_train_loader(make_cfg(pipes, None, *base), 0, 1)
    allowed = make_cfg(pipes, val, *base, "data.allow_pipe=true")
    batch = next(iter(build_train_loader(allowed, 0, 2)))
    assert len(batch["key"]) == 4 and batch["num_bad"] == 0
    assert sum(int(b["valid"].sum()) for b in build_val_loader(allowed, 0, 1)) == 360  # counted by a scan
    failing = make_cfg([f"pipe:cat {digits}/missing.tar"] * 2, None, *base, "data.allow_pipe=true")
    with pytest.raises(UserError, match="shards in a row gave no samples"):
        next(iter(build_train_loader(failing, 0, 1)))


def test_http_shards(digits):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = make_cfg(f"{url}/train-{{000000..000011}}.tar", f"{url}/val-{{000000..000002}}.tar",
                       "model.num_classes=10", "train.global_batch_size=8")  # fmt: skip
        assert next(iter(build_train_loader(cfg, 1, 2)))["num_bad"] == 0
        assert sum(int(b["valid"].sum()) for b in build_val_loader(cfg, 0, 1)) == 360
        exact = make_cfg(f"{url}/train-000000.tar", None, "model.num_classes=10", "data.order=exact")
        with pytest.raises(UserError, match="needs local files"):
            build_train_loader(exact, 0, 1)
    finally:
        server.shutdown()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vimoe_dist", "data", "from-folder", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "expected an ImageFolder tree" in proc.stderr


def test_failed_augmentation_is_retried_then_counted(digits):
    from vimoe_dist.data.baddata import BadSample
    from vimoe_dist.data.transforms import SampleDecoder

    decoder = SampleDecoder(make_cfg(f"{digits}/train-000000.tar", None, "model.num_classes=10"), training=True)
    real, calls = decoder.transform, []

    def flaky(image):  # stands in for timm's RandAugment drawing an op that Pillow rejects
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("bits must be between or equal to 1 and 8")
        return real(image)

    def broken(image):
        raise ValueError("always")

    with tarfile.open(digits / "train-000000.tar") as tar:
        png = tar.extractfile(next(n for n in tar.getnames() if n.endswith(".png"))).read()
    sample = {"__key__": "k", "__url__": "s", "png": png, "cls": b"1"}
    decoder.transform = flaky
    image, label = decoder(sample)
    assert image.shape == (3, 8, 8) and label == 1 and len(calls) == 2
    decoder.transform = broken
    with pytest.raises(BadSample, match="transform failed"):
        decoder(sample)
