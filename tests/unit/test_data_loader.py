"""The loader API the trainer uses, on the real digits shards: shapes, normalisation, batch-size rules, resume."""

from __future__ import annotations

import pytest
import torch

from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader, build_val_loader, micro_batch_size, write_digits
from vimoe_dist.errors import UserError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def make_cfg(digits, *overrides):
    return load_config(
        None,
        [
            f"data.train={digits}/train-{{000000..000011}}.tar",
            f"data.val={digits}/val-{{000000..000002}}.tar",
            "model.img_size=16",
            "model.num_classes=10",
            "model.moe.group_size=4",
            "train.global_batch_size=32",
            "data.scale=[0.6, 1.0]",
            "data.hflip=0",
            "data.num_workers=0",
            "data.shuffle_buffer=50",
            *overrides,
        ],
    )


def test_train_batches_have_the_contract_shapes(digits):
    cfg = make_cfg(digits)
    batch = next(iter(build_train_loader(cfg, rank=1, world_size=2)))
    assert batch["image"].shape == (16, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.long
    assert batch["num_bad"] == 0 and "target" not in batch
    # grayscale digits arrive as three equal channels, normalised with data.mean/std (background pixels are 0)
    mean, std = torch.tensor(cfg.data.mean), torch.tensor(cfg.data.std)
    pixels = batch["image"] * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(
        pixels[:, 1], pixels[:, 2], atol=1e-5
    )
    assert pixels.min() > -1e-3 and pixels.max() < 1 + 1e-3


def test_one_channel_model_and_mixup_targets(digits):
    cfg = make_cfg(digits, "model.in_chans=1", "data.mixup=0.8", "data.cutmix=1.0")
    batch = next(iter(build_train_loader(cfg, rank=0, world_size=1)))
    assert batch["image"].shape == (32, 1, 16, 16)
    assert batch["target"].shape == (32, 10)
    assert torch.allclose(batch["target"].sum(1), torch.ones(32))


def test_batch_size_rules_name_the_keys(digits):
    with pytest.raises(UserError, match=r"train\.global_batch_size: 32 is not divisible by world size"):
        micro_batch_size(make_cfg(digits), world_size=3)
    with pytest.raises(UserError, match=r"model\.moe\.group_size: 8 does not divide"):
        micro_batch_size(make_cfg(digits, "model.moe.group_size=8"), world_size=8)
    assert micro_batch_size(make_cfg(digits, "train.grad_accum=2"), world_size=2) == 8
    with pytest.raises(UserError, match="must be even"):
        build_train_loader(make_cfg(digits, "model.moe.group_size=1", "data.mixup=0.5"), 0, 1)


def test_val_loader_covers_the_split_once_with_equal_batch_counts(digits):
    cfg = make_cfg(digits)
    for world in (2, 4):
        seen, counts = [], []
        for rank in range(world):
            loader = build_val_loader(cfg, rank, world)
            batches = list(loader)
            counts.append(len(batches))
            assert len(batches) == len(loader)
            for b in batches:
                seen.extend(b["label"][b["valid"]].tolist())
        assert len(set(counts)) == 1
        assert len(seen) == 360


def test_state_dict_counts_steps_and_resume_does_not_replay(digits):
    cfg = make_cfg(digits, "train.grad_accum=2", "data.order=stream")
    loader = build_train_loader(cfg, 0, 1)
    it = iter(loader)
    first = [next(it)["image"] for _ in range(4)]
    state = loader.state_dict()
    assert state["step"] == 2 and state["micro_batches"] == 4 and state["order"] == "stream"
    resumed = next(iter(build_train_loader(cfg, 0, 1, start_step=2, state=state)))["image"]
    assert not any(torch.equal(resumed, x) for x in first)


def test_digits_stay_learnable_through_the_pipeline(digits):
    """Labels travel with their images and the demo's augmentation keeps digits recognisable: class means of the
    augmented training batches classify the validation batches well (nearest centroid; chance is 10%)."""
    cfg = make_cfg(digits, "data.scale=[0.7, 1.0]", "data.crop_pct=1.0", "data.shuffle_buffer=200")
    train = iter(build_train_loader(cfg, 0, 1))
    xs, ys = [], []
    for _ in range(45):  # one pass over the 1,437 training digits
        batch = next(train)
        xs.append(batch["image"][:, 0].flatten(1))
        ys.append(batch["label"])
    x, y = torch.cat(xs), torch.cat(ys)
    centroids = torch.stack([x[y == c].mean(0) for c in range(10)])
    correct = total = 0
    for batch in build_val_loader(cfg, 0, 1):
        valid = batch["valid"]
        pred = torch.cdist(batch["image"][valid][:, 0].flatten(1), centroids).argmin(1)
        correct += int((pred == batch["label"][valid]).sum())
        total += int(valid.sum())
    assert total == 360 and correct / total > 0.8, correct / total  # 0.87 measured
