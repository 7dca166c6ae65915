"""`vimoe data families`: a generated task on which routers differ, the default of `vimoe study routers`.

Classes come in families of visually distinct kinds of pattern (gratings, rings, blobs, checkers, wedges, bars);
within a family the classes differ by one fine attribute (orientation, ring spacing, number of blobs, cell count,
direction, bar width). Telling the families apart is easy for early layers; telling the members of a family apart
needs features of that family, which is what experts in deep layers can specialise in (ViMoE, Han et al. 2024:
routing in deep layers follows the semantic class). Every image also draws nuisances the classes do not depend
on - a colour tint, contrast, brightness, position, phase, a little jitter of the class attribute, and pixel noise -
so the fine distinctions stay hard at small resolution and a small model does not saturate in a few minutes, which
leaves room for routers to differ. With an object window (`--object PX`) the pattern covers only part of the image
and the rest is plain background, so a few tokens carry the class and the others do not: a task on which a router
that gives some tokens more expert compute than others (expert choice) could gain.

Images are lossless PNG; image i is a pure function of (seed, split, i); label = i mod the number of classes, so
every split is balanced.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable

import numpy as np

from vimoe_dist.data.manifest import Manifest
from vimoe_dist.data.writers import write_split

Grid = tuple[np.ndarray, np.ndarray]  # y, x in [0, 1)


def _gratings(c: int, n: int, g: Grid, rng: np.random.Generator) -> np.ndarray:
    angle = math.pi * c / n + rng.normal(0, 0.06)
    cycles = rng.uniform(1.5, 2.5)
    y, x = g
    return 0.5 + 0.5 * np.sin(2 * math.pi * cycles * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 7))


def _rings(c: int, n: int, g: Grid, rng: np.random.Generator) -> np.ndarray:
    cycles = 1.0 + 2.0 * c / max(n - 1, 1) + rng.normal(0, 0.08)  # rings per half-image
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    r = np.hypot(g[0] - cy, g[1] - cx)
    return 0.5 + 0.5 * np.cos(2 * math.pi * cycles * r * 2 + rng.uniform(0, 7))


def _blobs(c: int, n: int, g: Grid, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros_like(g[0])
    width = rng.uniform(0.07, 0.1)
    for cy, cx in rng.uniform(0.12, 0.88, size=(c + 1, 2)):
        img += np.exp(-((g[0] - cy) ** 2 + (g[1] - cx) ** 2) / (2 * width**2))
    return np.clip(img, 0, 1)


def _checkers(c: int, n: int, g: Grid, rng: np.random.Generator) -> np.ndarray:
    cells = 2 + c + rng.uniform(-0.15, 0.15)  # cells per side
    oy, ox = rng.uniform(0, 1, size=2)
    return ((np.floor(g[0] * cells + oy) + np.floor(g[1] * cells + ox)) % 2).astype(np.float64)


def _wedges(c: int, n: int, g: Grid, rng: np.random.Generator) -> np.ndarray:
    direction = 2 * math.pi * c / n + rng.normal(0, 0.1)
    cy, cx = rng.uniform(0.4, 0.6, size=2)
    angle = np.arctan2(g[0] - cy, g[1] - cx)
    return (np.cos(angle - direction) > math.cos(math.pi / 4)).astype(np.float64)


def _bars(c: int, n: int, g: Grid, rng: np.random.Generator) -> np.ndarray:
    duty = 0.2 + 0.6 * c / max(n - 1, 1) + rng.normal(0, 0.03)  # bright share of each period
    phase = (g[0] * rng.uniform(2.5, 3.5) + rng.uniform(0, 1)) % 1.0
    return (phase < duty).astype(np.float64)


PatternFn = Callable[[int, int, Grid, np.random.Generator], np.ndarray]
FAMILIES: dict[str, PatternFn] = {
    "gratings": _gratings,
    "rings": _rings,
    "blobs": _blobs,
    "checkers": _checkers,
    "wedges": _wedges,
    "bars": _bars,
}
MAX_PER_FAMILY = 8


def family_image(
    label: int, per_family: int, size: int, noise: float, rng: np.random.Generator, obj: int = 0
) -> np.ndarray:
    """One [size, size, 3] uint8 image of class `label` (family label // per_family, member label % per_family).

    obj > 0: the pattern fills an obj x obj window at a random place on a plain background, so only the tokens the
    window covers carry the class (the rest is noise).
    """
    family, member = divmod(label, per_family)
    pattern = list(FAMILIES.values())[family]
    side = obj or size
    y, x = np.mgrid[0:side, 0:side].astype(np.float64) / side
    img = np.full((size, size), 0.5)
    # the window's place is drawn only with a window, so a whole-image set is the same as before --object existed
    oy, ox = rng.integers(0, size - side + 1, size=2) if obj else (0, 0)
    img[oy : oy + side, ox : ox + side] = pattern(member, per_family, (y, x), rng)  # [0, 1]
    contrast, brightness = rng.uniform(0.35, 1.0), rng.uniform(-0.15, 0.15)
    tint = rng.uniform(0.3, 1.0, size=3)  # colour carries no class information
    rgb = 0.5 + brightness + contrast * (img[..., None] - 0.5) * tint
    rgb += rng.normal(0, noise, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


class _FamilySample:
    """Picklable sample function: index -> webdataset sample with a PNG image."""

    def __init__(
        self, split: str, num_classes: int, per_family: int, size: int, noise: float, seed: int, obj: int = 0
    ) -> None:
        self.split, self.num_classes, self.per_family = split, num_classes, per_family
        self.size, self.noise, self.seed, self.obj = size, noise, seed, obj

    def __call__(self, i: int) -> dict:
        from PIL import Image

        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
        label = i % self.num_classes
        buf = io.BytesIO()
        img = family_image(label, self.per_family, self.size, self.noise, rng, self.obj)
        Image.fromarray(img).save(buf, format="PNG")
        return {"__key__": f"{self.split}{i:08d}", "png": buf.getvalue(), "cls": label}


def class_names(num_families: int, per_family: int) -> list[str]:
    """`gratings0`, `gratings1`, ..., `rings0`, ...: the family is the name's stem."""
    return [f"{name}{m}" for name in list(FAMILIES)[:num_families] for m in range(per_family)]


def write_families(
    out_dir: str | os.PathLike,
    num_families: int = 4,
    per_family: int = 4,
    num_images: int = 24000,
    num_val: int = 8000,
    size: int = 16,
    noise: float = 0.2,
    object_size: int = 0,
    max_count: int = 1000,
    num_procs: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Writes `num_images` train and `num_val` val images of `num_families` x `per_family` classes."""
    from vimoe_dist.errors import UserError

    if not 1 <= num_families <= len(FAMILIES):
        raise UserError(
            f"--families: must be between 1 and {len(FAMILIES)} ({', '.join(FAMILIES)}), got {num_families}"
        )
    if not 2 <= per_family <= MAX_PER_FAMILY:
        raise UserError(f"--per-family: must be between 2 and {MAX_PER_FAMILY}, got {per_family}")
    if num_images < 1 or num_val < 0 or size < 8 or not 0 <= noise <= 1:
        raise UserError(
            f"families: need --images >= 1, --val-images >= 0, --size >= 8 and --noise in [0, 1] "
            f"(got {num_images}, {num_val}, {size}, {noise})"
        )
    classes = class_names(num_families, per_family)
    if object_size and not 4 <= object_size <= size:
        raise UserError(f"--object: the window must be 0 (whole image) or 4 to --size {size} px, got {object_size}")
    source = f"families:seed={seed},size={size},noise={noise},families={num_families},per_family={per_family}"
    source += f",object={object_size}" if object_size else ""
    return {
        split: write_split(
            out_dir, split, n, _FamilySample(split, len(classes), per_family, size, noise, seed, object_size), classes,
            max_count=max_count, num_procs=num_procs, source=source, progress=progress,
        )
        for split, n in (("train", num_images), ("val", num_val))
        if n > 0
    }  # fmt: skip
