"""The allowed range of every numeric key, the first check of `validate` (validation.py). Every numeric key has a row
in BOUNDS, `"section.key": Bound(low, high, low_open=..., high_open=...)`, checked for each element of a list key;
floats must be finite too. A new numeric key needs a new row (a test lists the keys without one; until then the key
only has to fit in an int64). Checks across keys stay in `validate`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from vimoe_dist.config.coerce import _show
from vimoe_dist.config.schema import ConfigError

MAX_SEED = 2**63 - 1  # what every RNG we seed accepts (torch.manual_seed: a 64-bit integer)
MAX_STEPS = 10**9  # steps x images per step stay below 2**53: exact as float64 and as a JSON number
MAX_BATCH = 2**20  # images per step; 16x the largest published ViT batch (ViT-22B: 65,536)
MAX_RANKS = 2**20
MAX_EXPERTS = 2**16
MAX_ITERS = 10**4  # iterations of an iterative router (Sinkhorn, sparse OT) in every forward pass
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a collective timeout of a week is no timeout; datetime.timedelta overflows later


@dataclass(frozen=True)
class Bound:
    """The allowed interval of a numeric key (of each element of a list key); None leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False

    def holds(self, x: float) -> bool:
        above = self.low is None or x > self.low or (x == self.low and not self.low_open)
        below = self.high is None or x < self.high or (x == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


# One row per numeric key (int, float, a list of them, or one of these or null), checked before anything runs; every
# float must also be finite. A key without a row still has to fit in an int64 (a test asks for a row for every key).
# Keys of model.backbone_kwargs (timm's own arguments) are checked when they are given.
BOUNDS: dict[str, Bound] = {
    "run.seed": Bound(0, MAX_SEED),
    "train.steps": Bound(1, MAX_STEPS),
    "train.global_batch_size": Bound(1, MAX_BATCH),
    "train.grad_accum": Bound(1, MAX_BATCH),
    "train.lr": Bound(0, low_open=True),
    "train.min_lr": Bound(0),
    "train.warmup_steps": Bound(0, MAX_STEPS),
    "train.weight_decay": Bound(0),
    "train.layer_decay": Bound(0, 1, low_open=True),
    "train.betas": Bound(0, 1, high_open=True),  # AdamW's moment decay: 1 never forgets, > 1 diverges
    "train.grad_clip": Bound(0),
    "train.label_smoothing": Bound(0, 1, high_open=True),
    "train.log_every": Bound(1, MAX_STEPS),
    "train.eval_every": Bound(0, MAX_STEPS),
    "train.checkpoint_every": Bound(0, MAX_STEPS),
    "train.keep_checkpoints": Bound(1, MAX_STEPS),
    "train.max_bad_steps": Bound(0, MAX_STEPS),
    "train.stop_at": Bound(0, MAX_STEPS),
    "parallel.ep_size": Bound(1, MAX_RANKS),
    "parallel.zero_stage": Bound(0, 2),
    "parallel.timeout_s": Bound(0, MAX_TIMEOUT_S, low_open=True),
    "model.img_size": Bound(1, 2**14),
    "model.in_chans": Bound(1, 2**12),  # hyperspectral images have a few hundred bands
    "model.num_classes": Bound(1, 2**24),
    "model.drop_path": Bound(0, 1, high_open=True),
    "model.backbone_kwargs.depth": Bound(1, 2**10),
    "model.backbone_kwargs.embed_dim": Bound(1, 2**16),
    "model.backbone_kwargs.num_heads": Bound(1, 2**12),
    "model.backbone_kwargs.mlp_ratio": Bound(0, 64, low_open=True),
    "model.backbone_kwargs.patch_size": Bound(1, 2**14),
    "model.moe.num_experts": Bound(1, MAX_EXPERTS),
    "model.moe.top_k": Bound(1, MAX_EXPERTS),
    # above num_experts / top_k nothing is dropped, so a larger factor changes nothing
    "model.moe.capacity_factor": Bound(0, MAX_EXPERTS, low_open=True),
    "model.moe.eval_capacity_factor": Bound(0, MAX_EXPERTS, low_open=True),
    "model.moe.min_capacity": Bound(1, 2**31 - 1),  # the capacity is clamped to the group's units anyway
    "model.moe.group_size": Bound(1, MAX_BATCH),
    "model.moe.hidden_ratio": Bound(0, 64, low_open=True),
    "model.moe.noise_std": Bound(0),
    "model.moe.slots_per_expert": Bound(1, 2**16),
    "model.moe.sinkhorn_iters": Bound(1, MAX_ITERS),
    "model.moe.sparse_gamma": Bound(0, low_open=True),
    "model.moe.sparse_iters": Bound(1, MAX_ITERS),
    "model.moe.importance_loss": Bound(0),
    "model.moe.load_loss": Bound(0),
    "model.moe.switch_loss": Bound(0),
    "model.moe.z_loss": Bound(0),
    "data.num_workers": Bound(0, 256),
    "data.prefetch": Bound(1, 1024),
    "data.shuffle_buffer": Bound(0, 2**24),
    "data.max_bad_fraction": Bound(0, 1),
    "data.mean": Bound(0, 1),  # of pixel values in [0, 1] (timm's scale; 0-255 means like 123.7 are a mistake)
    "data.std": Bound(0, 1, low_open=True),
    "data.scale": Bound(0, 1, low_open=True),
    "data.hflip": Bound(0, 1),
    "data.mixup": Bound(0),
    "data.cutmix": Bound(0),
    "data.crop_pct": Bound(0, 1, low_open=True),
    "data.color_jitter": Bound(0),
    "data.http_timeout_s": Bound(0, 7 * 86400, low_open=True),  # total time to read one http(s) shard
    "data.max_image_pixels": Bound(1, 2**31),  # PIL refuses more than ~179 M pixels anyway
    "metrics.port": Bound(0, 65535),
    "metrics.push_timeout_s": Bound(0, 3600, low_open=True),
    "metrics.peak_tflops": Bound(0, 10**6, low_open=True),  # GB200: 2,500 dense bf16; 10^6 is an exaFLOP/s device
}
_INT64 = Bound(-(2**63), 2**63 - 1)


def _is_numeric_type(tp: Any) -> bool:
    """int, float, a tuple of them, or one of these or null (bool is not a number here)."""
    if tp in (int, float):
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (tuple, typing.Union, types.UnionType):
        return bool(args) and all(_is_numeric_type(a) for a in args)
    return False


def _check_number(key: str, x: Any, bound: Bound) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return
    if (isinstance(x, float) and not math.isfinite(x)) or not bound.holds(x):
        kind = "an integer" if isinstance(x, int) else "a finite number"
        raise ConfigError(f"{key}: must be {kind} {bound}, got {_show(x)}")


def _check_bounds(obj: Any, prefix: str = "") -> None:
    """Every numeric key of the dataclass tree `obj` against its BOUNDS row (elements of a list one by one)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".")
        elif _is_numeric_type(hints[f.name]):
            bound = BOUNDS.get(key, _INT64)
            for i, x in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
                _check_number(key if i is None else f"{key}[{i}]", x, bound)
