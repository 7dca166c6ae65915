"""`vimoe data synthetic`: learnable synthetic images at any scale, for tests and benchmarks.

Class c is an oriented sinusoidal grating: orientation, spatial frequency and a colour tint are functions of c
(the angles spread over half a turn, so classes differ visibly even at 16 classes; beyond that, frequency and
tint separate them). Each image draws its own phase, a small orientation jitter, contrast and additive noise, so a
model must learn the pattern rather than memorise pixels. Images are JPEG (quality 90) like ImageNet's, so
decoding costs what it costs on real data. Image i is a pure function of (seed, split, i).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from vimoe_dist.data.manifest import Manifest
from vimoe_dist.data.staging import StagedWrite
from vimoe_dist.data.writers import write_split


def class_pattern(label: int, num_classes: int) -> tuple[float, float, np.ndarray]:
    """(angle in radians, cycles per image, RGB tint in [0.4, 1]) of class `label`."""
    golden = (math.sqrt(5) - 1) / 2
    angle = math.pi * ((label * golden) % 1.0)
    cycles = 2.0 + 4.0 * ((label * 0.37 + label // 8 * 0.21) % 1.0)
    hue = 2 * math.pi * ((label * 0.618 + 0.1) % 1.0)
    tint = 0.7 + 0.3 * np.cos(hue + np.array([0.0, 2.1, 4.2]))
    return angle, cycles, tint


def synthetic_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [size, size, 3] uint8 image of class `label`."""
    angle, cycles, tint = class_pattern(label, num_classes)
    angle += rng.normal(0, 0.05)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    contrast = rng.uniform(0.6, 1.0)
    img = 0.5 + 0.5 * contrast * wave[..., None] * tint[None, None, :]
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


class _SyntheticSample:
    def __init__(self, split: str, num_classes: int, size: int, seed: int) -> None:
        self.split, self.num_classes, self.size, self.seed = split, num_classes, size, seed

    def __call__(self, i: int) -> dict:
        from PIL import Image

        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
        label = i % self.num_classes
        buf = io.BytesIO()
        Image.fromarray(synthetic_image(label, self.num_classes, self.size, rng)).save(buf, format="JPEG", quality=90)
        return {"__key__": f"{self.split}{i:08d}", "jpg": buf.getvalue(), "cls": label}


def write_synthetic(
    out_dir: str | os.PathLike,
    num_classes: int = 10,
    num_images: int = 1000,
    size: int = 64,
    num_val: int | None = None,
    max_count: int = 1000,
    num_procs: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Writes `num_images` train and `num_val` (default a tenth, at least one per class) val images."""
    if num_classes < 1 or num_images < 1 or size < 8:
        from vimoe_dist.errors import UserError

        raise UserError(
            f"synthetic: need classes >= 1, images >= 1, size >= 8 (got {num_classes}, {num_images}, {size})"
        )
    num_val = max(num_images // 10, num_classes) if num_val is None else num_val
    classes = [f"pattern{c}" for c in range(num_classes)]
    splits = [(split, n) for split, n in (("train", num_images), ("val", num_val)) if n > 0]
    with StagedWrite(out_dir, [split for split, _ in splits]) as stage:
        return {
            split: write_split(
                stage.dir, split, n, _SyntheticSample(split, num_classes, size, seed), classes,
                max_count=max_count, num_procs=num_procs, source=f"synthetic:seed={seed},size={size}",
                progress=progress,
            )
            for split, n in splits
        }  # fmt: skip
