"""Decoding and augmentation: bytes -> PIL image -> timm transform -> normalised tensor, plus the RNG scopes that
make augmentation reproducible.

Training images go through timm's `create_transform` (random resized crop with `data.scale`, flip with
`data.hflip`, optional RandAugment via `data.auto_augment`, as in DeiT / timm's train.py); evaluation uses its
resize + center crop with `data.crop_pct`. Grayscale sources (the digits, ImageNet's grayscale JPEGs) and CMYK
JPEGs become RGB when the model takes 3 channels; the decoder reads the format from the bytes, not the name (ImageNet
has a PNG named .JPEG). An image larger than `data.max_image_pixels` is a bad sample, refused from its header
before decoding: PIL's own bomb check starts at 89 megapixels, and a few such images per batch exhaust a worker.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from vimoe_dist.config import Config
from vimoe_dist.data.baddata import BadSample
from vimoe_dist.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
LABEL_EXTS = ("cls", "label", "class")


def normalisation(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`data.mean` / `data.std` for the model's channels (a 1-channel model uses their averages)."""
    in_chans = cfg.model.in_chans
    if in_chans == 3:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    if in_chans == 1:
        return (float(np.mean(cfg.data.mean)),), (float(np.mean(cfg.data.std)),)
    raise UserError(f"model.in_chans: the image loader makes 1- or 3-channel images, not {in_chans}")


def build_transform(cfg: Config, training: bool) -> Callable:
    """timm's transform for training (augmented when data.augment) or evaluation."""
    from timm.data import create_transform

    d = cfg.data
    mean, std = normalisation(cfg)
    if training and d.augment:
        return create_transform(
            cfg.model.img_size,
            is_training=True,
            scale=tuple(d.scale),
            hflip=d.hflip,
            color_jitter=d.color_jitter,
            auto_augment=d.auto_augment,
            interpolation=d.interpolation,
            mean=mean,
            std=std,
        )
    return create_transform(
        cfg.model.img_size, is_training=False, interpolation=d.interpolation, mean=mean, std=std, crop_pct=d.crop_pct
    )


class SampleDecoder:
    """webdataset sample dict -> (image tensor [C, H, W], label); raises `BadSample` naming shard and key."""

    def __init__(self, cfg: Config, training: bool) -> None:
        self.transform = build_transform(cfg, training)
        self.mode = "RGB" if cfg.model.in_chans == 3 else "L"
        self.num_classes = cfg.model.num_classes
        self.max_pixels = cfg.data.max_image_pixels

    def label(self, sample: dict) -> int:
        shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        raw = next((sample[e] for e in LABEL_EXTS if e in sample), None)
        if raw is None:
            raise BadSample(shard, key, "missing label (.cls)")
        try:
            label = int(raw)
        except ValueError:
            raise BadSample(shard, key, f"label {raw[:20]!r} is not an integer") from None
        if not 0 <= label < self.num_classes:
            raise BadSample(shard, key, f"label {label} outside model.num_classes={self.num_classes}")
        return label

    def image(self, sample: dict):
        from PIL import Image

        shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        raw = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if raw is None:
            raise BadSample(shard, key, f"missing image (none of .{', .'.join(IMAGE_EXTS[:3])}, ...)")
        try:
            with Image.open(io.BytesIO(raw)) as img:  # reads the header only
                pixels = img.width * img.height
                if pixels > self.max_pixels:  # before the decode: a small file can decode to gigabytes
                    raise BadSample(shard, key, f"{img.width}x{img.height} pixels, over data.max_image_pixels")
                return img.convert(self.mode)  # convert() forces the full decode: corrupt data fails here
        except BadSample:
            raise
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
            raise BadSample(shard, key, f"corrupt image ({type(e).__name__}: {str(e)[:80]})") from None

    def augment(self, sample: dict, image) -> torch.Tensor:
        """The transform, drawn again (from the same, advancing RNG) when a random augmentation fails: timm's
        RandAugment with `inc1` can ask Pillow >= 11 to posterize to 0 bits, a ValueError on ~0.2% of images that
        says nothing about the image. Three failures in a row count the sample as bad."""
        for _ in range(3):
            try:
                return self.transform(image)
            except Exception as e:
                error = e
        shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        raise BadSample(shard, key, f"transform failed ({type(error).__name__}: {str(error)[:80]})")

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        label = self.label(sample)
        return self.augment(sample, self.image(sample)), label


def seed_from(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: different tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)[0])


@contextmanager
def global_rng(seed: int | None = None, state: dict | None = None):
    """Runs the body with the global python / numpy / torch RNGs set from `seed` or a saved `state`, and restores
    the caller's RNGs afterwards (timm's transforms draw from the global RNGs; the trainer's must not move).

    Yields a dict that holds the body's final RNG state on exit, for continuing a stream later.
    """
    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    out: dict = {}
    try:
        if state is not None:
            random.setstate(state["python"])
            np.random.set_state(state["numpy"])
            torch.random.set_rng_state(state["torch"])
        elif seed is not None:
            set_global_seed(seed)
        yield out
        out.update(python=random.getstate(), numpy=np.random.get_state(), torch=torch.random.get_rng_state())
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


def set_global_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # the CPU generator only: torch.manual_seed also queues CUDA seeding and costs milliseconds per call
    torch.default_generator.manual_seed(seed)
