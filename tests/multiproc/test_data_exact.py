"""`data.order: exact`: the global batches of 20 steps are identical - same sample keys, same augmented pixels, same
mixup targets - on 1, 2 and 4 ranks with 0, 1 and 2 DataLoader workers (worker processes are real; the ranks of
one layout run in this process, each with its own loader, which is all a rank's loader depends on)."""

from __future__ import annotations

import pytest
import torch

from vimoe_dist.config import load_config
from vimoe_dist.data import build_train_loader, write_digits

STEPS = 20
LAYOUTS = [(world, workers) for world in (1, 2, 4) for workers in (0, 1, 2)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def make_cfg(digits, workers, *extra):
    return load_config(
        None,
        [
            f"data.train={digits}/train-{{000000..000011}}.tar",
            "data.order=exact",
            "model.img_size=12",
            "model.num_classes=10",
            "model.moe.group_size=2",
            "train.global_batch_size=16",
            "data.scale=[0.5, 1.0]",
            "data.hflip=0.5",
            "data.mixup=0.8",
            "data.cutmix=1.0",
            f"data.num_workers={workers}",
            "data.prefetch=2",
            "run.seed=3",
            *extra,
        ],
    )


def global_batches(cfg, world, start_step=0, steps=STEPS):
    iters = [iter(build_train_loader(cfg, rank, world, start_step=start_step)) for rank in range(world)]
    out = []
    for _ in range(steps * cfg.train.grad_accum):
        batches = [next(it) for it in iters]  # micro-batch a of every rank, ranks in order
        out.append(
            (
                [k for b in batches for k in b["key"]],
                torch.cat([b["image"] for b in batches]),
                torch.cat([b["target"] for b in batches]),
            )
        )
    return out


@pytest.fixture(scope="module")
def reference(digits):
    return global_batches(make_cfg(digits, 0), 1)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize(("world", "workers"), LAYOUTS[1:])
def test_global_batches_do_not_depend_on_ranks_or_workers(digits, reference, world, workers):
    got = global_batches(make_cfg(digits, workers), world)
    for step, ((keys, image, target), (ref_keys, ref_image, ref_target)) in enumerate(zip(got, reference)):
        assert keys == ref_keys, step
        assert torch.equal(image, ref_image), step
        assert torch.equal(target, ref_target), step


def test_reference_is_augmented_and_covers_distinct_samples(reference):
    keys = [k for ks, _, _ in reference for k in ks]
    assert len(keys) == STEPS * 16 and len(set(keys)) == len(keys)  # 320 < 1437: one epoch, no repeats
    # augmentation is on: a sample's pixels are not the eval transform's (mixup alone would not prove it)
    assert not torch.equal(reference[0][1], reference[1][1])


def test_grad_accum_and_resume_keep_the_global_batches(digits, reference):
    accum = global_batches(make_cfg(digits, 0, "train.grad_accum=2"), 2, steps=STEPS)
    for step in range(STEPS):
        keys = accum[2 * step][0] + accum[2 * step + 1][0]
        assert keys == reference[step][0]
    resumed = global_batches(make_cfg(digits, 0), 4, start_step=STEPS - 3, steps=3)
    for (keys, image, _), (ref_keys, ref_image, _) in zip(resumed, reference[-3:]):
        assert keys == ref_keys and torch.equal(image, ref_image)
