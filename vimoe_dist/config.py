"""The configuration schema: dataclasses, YAML loading, dot-list overrides and validation.

One YAML file holds a run, given as a path or as the name of a shipped config (`digits`, `vimoe_s14_imagenet`: see
vimoe_dist/resources.py); `configs/*.yaml` may start with `base: other.yaml` to overlay another file (a path
relative to the including file). Overrides on the command line use the same dotted paths
(`model.moe.num_experts=16`); their values are parsed as YAML scalars. Every bad key or value raises `ConfigError`, a
one-line `ValueError` that names the key and the value (shortened: a value is never printed whole).

Hostile input is refused before anything runs. YAML, from a file or an override, is capped in size
(MAX_YAML_BYTES), in values once aliases are expanded (MAX_YAML_NODES: an alias bomb is a few hundred bytes) and in
nesting (MAX_YAML_DEPTH), checked on the parser's events before any object is built; floats such as `1e-3`, which
YAML 1.1 reads as strings, are numbers. String keys hold no control characters and at most MAX_STRING_CHARS.

Every numeric key has a row in BOUNDS, `"section.key": Bound(low, high, low_open=..., high_open=...)`, checked for
each element of a list key; floats must be finite too. A new numeric key needs a new row (a test lists the keys
without one; until then the key only has to fit in an int64). Checks across keys stay in `validate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import reprlib
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vimoe_dist.errors import UserError
from vimoe_dist.model.moe.registry import ALL_ROUTER_OPTIONS, ROUTER_NAMES, ROUTER_SPECS
from vimoe_dist.resources import find_config


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message is one line naming the key."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto: continue from the latest checkpoint in out_dir; never; or a checkpoint directory
    trust_checkpoint: bool = False  # allow torch.load without weights_only for files we did not write
    device: str = "auto"  # auto: CUDA when usable (an error under a GPU allocation without it); cuda; cpu


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-3  # peak learning rate for the global batch
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT); 0.65-0.75 when fine-tuning from DINOv2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 disables
    label_smoothing: float = 0.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    stop_at: int = 0  # checkpoint and exit cleanly at this step (time-boxed jobs); 0: run to train.steps
    progress: bool = True


@dataclass
class ParallelConfig:
    ep_size: int = 1
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16; the router always computes in fp32
    timeout_s: float = 600.0  # collective timeout: a dead or hung rank ends the job within this
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    # merged into the generated DeepSpeed config (its monitors, communication settings, ...); keys the trainer owns
    # (batch sizes, ZeRO stage, precision, optimizer, scheduler, clipping) are refused: parallel/ds_config.py
    deepspeed: dict = field(default_factory=dict)


@dataclass
class MoEConfig:
    layers: Any = "last-2"  # "last-L" or a list of block indices; "last-0" / [] is the dense baseline
    num_experts: int = 8
    router: str = "tc-softmax"
    top_k: int = 2
    capacity_factor: float | None = 1.25  # None: dropless (token choice only)
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    min_capacity: int = 1
    shared_expert: bool = True
    routing: str = "image"  # image | token
    pool: str = "cls"  # image routing: cls | mean (of patch tokens)
    group_size: int = 8  # images per routing group; capacity and routing never cross groups
    hidden_ratio: float | None = None  # expert hidden size / dim; None: the backbone's mlp_ratio
    # router options: each router takes the ones model/moe/registry.py lists for it; setting another is an error
    bpr: bool = True
    renormalize: bool = False
    noise_std: float = 0.0  # gate noise std relative to 1/E (V-MoE): N(0, (noise_std / E)^2); absolute for soft
    slots_per_expert: int | None = None  # soft; None: round(U * capacity_factor / E) per group of U units (vmoe)
    sinkhorn_iters: int = 10
    sparse_gamma: float = 1.0
    sparse_iters: int = 50
    # auxiliary loss weights
    importance_loss: float = 0.0
    load_loss: float = 0.0
    switch_loss: float = 0.01
    z_loss: float = 0.0


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch14_dinov2"
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    pretrained: str | None = None  # a checkpoint file (timm or DINOv2 layout) or, online, a timm name
    drop_path: float = 0.0
    global_pool: str = "token"
    backbone_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (depth, embed_dim, ...)
    dense_ffn_hidden: dict = field(default_factory=dict)  # block -> hidden size of its dense FFN (`vimoe prune`)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class DataConfig:
    train: Any = None  # shard pattern(s): brace pattern, list, local path, http(s)://, pipe: (needs allow_pipe)
    val: Any = None
    num_workers: int = 2
    prefetch: int = 2
    shuffle_buffer: int = 1000
    # exact (the default): the same global batches on any number of ranks, and a resume continues with the very batches
    # it would have had; needs local uncompressed tars. stream: sequential reads (http(s), pipe:, gz), a little faster,
    # and a resume continues with fresh data. `vimoe bench data` measures both.
    order: str = "exact"
    allow_pipe: bool = False
    max_bad_fraction: float = 0.01
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: str | None = None  # a timm auto-augment string, e.g. rand-m9-mstd0.5-inc1
    mixup: float = 0.0
    cutmix: float = 0.0
    crop_pct: float = 0.875
    color_jitter: float = 0.0  # timm's color jitter strength (it is off whenever auto_augment is set)
    interpolation: str = "bicubic"  # resize interpolation: bicubic | bilinear | nearest | random
    http_timeout_s: float = 600.0  # total time to read one http(s) shard (a silent server fails within it)
    max_image_pixels: int = 40_000_000  # a larger image is a bad sample (decompression bombs below PIL's limit)


@dataclass
class WandbConfig:
    project: str | None = None  # W&B is on when a project or a mode other than disabled is set
    entity: str | None = None
    name: str | None = None  # the run's display name; None: the run directory's name
    group: str | None = None
    tags: Any = field(default_factory=list)  # a list of strings
    mode: str | None = None  # offline | online | disabled; None: $WANDB_MODE, else online


@dataclass
class MetricsConfig:
    port: int = 0  # 0: no Prometheus endpoint; rank r serves on port + LOCAL_RANK (shipped configs: 19400)
    addr: str = "127.0.0.1"  # loopback by default: the endpoint is unauthenticated
    port_search: bool = True  # a taken port: one warning and the next free one (false: a one-line error)
    tensorboard: bool = False  # rank 0 writes RUN/tb/ (needs the tensorboard package)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, rank 0 (needs the wandb package)
    pushgateway: str | None = None  # http(s)://host:port or host:port; each rank pushes its final values at exit
    push_timeout_s: float = 10.0
    job: str = "vimoe"  # the `job` label of every series
    peak_tflops: float | None = None  # dense peak TFLOP/s of one device for MFU; None: the GPU's datasheet figure


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML file or shipped config (following `base:` overlays), applies `key=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml_with_bases(find_config(path), seen=())
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    _drop_retired_impl(raw)
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _drop_retired_impl(raw: dict) -> None:
    """`model.moe.impl` left the config: the trainer builds our MoE layer only, and DeepSpeed's and fairscale's
    layers are comparison baselines that `vimoe bench moe` and the parity tests pass as layer factories. The
    `config.yaml` of an older run still says `impl: vimoe`, which is dropped; any other value is refused."""
    model = raw.get("model")
    moe = model.get("moe") if isinstance(model, dict) else None
    if isinstance(moe, dict) and "impl" in moe:
        impl = moe.pop("impl")
        if impl != "vimoe":
            raise ConfigError(
                f"model.moe.impl: {impl!r} cannot be trained; DeepSpeed's and fairscale's layers are comparison "
                "baselines (`vimoe bench moe`): remove the key"
            )


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value); values are YAML scalars or flow collections, read under the same caps
    as a config file."""
    if len(item) > MAX_YAML_BYTES:
        raise ConfigError(f"override {_show(item)}: longer than {MAX_YAML_BYTES // 1024} KiB")
    if "=" not in item:
        raise ConfigError(f"override {_show(item)} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {_show(item)}: {_show(key)} is not a dotted config key")
    if key.count(".") >= MAX_YAML_DEPTH:
        raise ConfigError(f"override {_show(key)}: nested deeper than {MAX_YAML_DEPTH} levels")
    value = _load_yaml(text, f"override {key}") if text.strip() else None
    return key, value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# ------------------------------------------------------------------------------------------- YAML reading

MAX_YAML_BYTES = 256 * 1024  # one config file or one override; the shipped configs are under 2 KiB
MAX_YAML_NODES = 10_000  # values and collections, aliases counted at their expanded size
MAX_YAML_DEPTH = 32  # nested collections (the schema needs 4; backbone_kwargs a few more)
MAX_BASE_CHAIN = 16  # files in one chain of `base:` overlays

_YAML_LOADER_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


class _ConfigLoader(_YAML_LOADER_BASE):
    """PyYAML's safe loader (no tags that build Python objects), also reading YAML 1.2 floats written without a dot
    or without an exponent sign (`1e-3`, `5E4`) as numbers: YAML 1.1, which PyYAML follows, makes them strings."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str | bytes, what: str) -> Any:
    """Parses one YAML document after checking its size, expanded size and depth (an alias bomb or deep nesting is
    refused from the parser's events, before any object is built)."""
    if isinstance(text, str):  # what libyaml reads; a command-line argument may hold undecodable bytes
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"{what}: not UTF-8 text (character {e.start + 1} is {_show(text[e.start])})") from None
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what}: larger than {MAX_YAML_BYTES // 1024} KiB")
    _check_yaml_shape(text, what)
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_reason(e)}") from None
    except (ValueError, OverflowError) as e:  # an integer beyond Python's digit limit, a date like 2024-13-01
        raise ConfigError(f"{what}: cannot read a value ({_first_line(e)})") from None
    finally:
        loader.dispose()


def _check_yaml_shape(text: bytes, what: str) -> None:
    """Counts nodes with every alias expanded (the billion-laughs bomb is a few hundred bytes of aliases) and the
    nesting depth (the composer recurses per level) over the parser's event stream, which holds nothing deep."""
    total = 0
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, total before it) per collection not yet closed
    sizes: dict[str, int] = {}  # anchor -> expanded size of its node
    try:
        for event in yaml.parse(text, Loader=_YAML_LOADER_BASE):
            if isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for anchor, _ in open_nodes):
                    raise ConfigError(f"{what}: alias *{_show(event.anchor)} refers to a node that contains it")
                total += sizes.get(event.anchor, 1)  # an undefined alias: the composer names it below
            elif isinstance(event, yaml.ScalarEvent):
                total += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                open_nodes.append((event.anchor, total))
                total += 1
                if len(open_nodes) > MAX_YAML_DEPTH:
                    raise ConfigError(f"{what}: nested deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = total - before
            if total > MAX_YAML_NODES:
                raise ConfigError(f"{what}: more than {MAX_YAML_NODES} values once its aliases are expanded")
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_reason(e)}") from None


def _yaml_reason(e: BaseException) -> str:
    """What PyYAML found wrong and where, in one line (its message starts with the context, e.g. 'while parsing')."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return _first_line(ValueError(e.problem)) + where
    return _first_line(e)


def _show_path(path: Path) -> str:
    """A file name in a message: whole (the user has to find the file), unless it is absurdly long."""
    text = str(path)
    return repr(text) if len(text) <= 1000 else _show(text)


def _read_config_file(path: Path) -> bytes:
    """The file's bytes, at most MAX_YAML_BYTES; a FIFO or device is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"config file {_show_path(path)} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise ConfigError(f"config file {_show_path(path)}: {getattr(e, 'strerror', None) or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {_show_path(path)} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config file {_show_path(path)}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"config file {_show_path(path)}: larger than {MAX_YAML_BYTES // 1024} KiB")
    return data


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    """The file's mapping over its `base:` file's (a path relative to the including file's directory, or absolute;
    `..` is allowed: the router overlays in configs/routers/ use it)."""
    if len(seen) >= MAX_BASE_CHAIN:
        raise ConfigError(f"config file {_show_path(path)}: more than {MAX_BASE_CHAIN} files chained through 'base'")
    text = _read_config_file(path)
    if path.resolve() in seen:
        raise ConfigError(f"config file {_show_path(path)} includes itself through 'base'")
    data = _load_yaml(text, f"config file {_show_path(path)}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {_show_path(path)} must hold a mapping, not {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip() or _CONTROL.search(base):
        raise ConfigError(f"config file {_show_path(path)}: base: {_show(base)} is not a file name")
    merged = _read_yaml_with_bases(path.parent / base, (*seen, path.resolve()))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "backbone_kwargs":
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {_show(key)}: {_show(part)} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        first = min(unknown, key=repr)  # YAML keys may be numbers or null too, which do not sort with strings
        name = first if isinstance(first, str) and len(first) <= 60 and not _CONTROL.search(first) else _show(first)
        raise ConfigError(f"unknown config key '{prefix}{name}'; known in {where}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


MAX_STRING_CHARS = 4096  # a string key (a path at most: Linux's PATH_MAX)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no string key needs one; a newline or NUL in a path is hostile

_REPR = reprlib.Repr()  # values in messages: a few elements, levels and characters, always one short line
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def _show(value: Any) -> str:
    """`repr(value)` cut short: an alias-expanded list or a long string must not make a huge error message."""
    return _REPR.repr(value)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                if arg in (str, float) and isinstance(value, str if arg is str else (int, float)):
                    raise  # the right type, out of range or too long: that message says more than the type's name
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{key}: must be a finite number, got {_show(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        if len(value) > MAX_STRING_CHARS:
            raise ConfigError(f"{key}: longer than {MAX_STRING_CHARS} characters ({_show(value)})")
        if _CONTROL.search(value):
            raise ConfigError(f"{key}: control characters (newline, NUL, ...) are not allowed, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")


# -------------------------------------------------------------------------------------------- validation

ROUTING_MODES = ("image", "token")
POOL_MODES = ("cls", "mean")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_ORDERS = ("stream", "exact")


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


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {_show(value)} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    """Checks that need no model or world size; layer indices are checked against depth in build_model."""
    t, p, m, moe, d = cfg.train, cfg.parallel, cfg.model, cfg.model.moe, cfg.data
    _check_bounds(cfg)
    for name, value in m.backbone_kwargs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"model.backbone_kwargs: {_show(name)} is not an argument name")
        _check_number(f"model.backbone_kwargs.{name}", value, BOUNDS.get(f"model.backbone_kwargs.{name}", _INT64))
    _choice("run.device", cfg.run.device, ("auto", "cuda", "cpu"))
    _choice("run.resume", cfg.run.resume if cfg.run.resume in ("auto", "never") else "auto", ("auto", "never"))
    for key in ("steps", "global_batch_size", "grad_accum", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in (
        "eval_every",
        "checkpoint_every",
        "warmup_steps",
        "max_bad_steps",
        "weight_decay",
        "grad_clip",
        "stop_at",
    ):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _positive("train.lr", t.lr)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    if not 0 < t.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay: must be in (0, 1], got {t.layer_decay!r}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing!r}")
    _positive("parallel.ep_size", p.ep_size)
    _choice("parallel.zero_stage", p.zero_stage, (0, 1, 2))
    _choice("parallel.precision", p.precision, PRECISIONS)
    _choice("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    _positive("parallel.timeout_s", p.timeout_s)
    _positive("model.img_size", m.img_size)
    _positive("model.num_classes", m.num_classes)
    for block, hidden in m.dense_ffn_hidden.items():
        if not isinstance(block, int) or isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"model.dense_ffn_hidden: {block!r}: {_show(hidden)} is not block index: hidden size")
        _check_number(f"model.dense_ffn_hidden.{block}", hidden, Bound(1, 2**20))
    if not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.drop_path: must be in [0, 1), got {m.drop_path!r}")
    _positive("model.moe.num_experts", moe.num_experts)
    if moe.router not in ROUTER_NAMES:
        raise ConfigError(f"model.moe.router: unknown router {_show(moe.router)}; known: {', '.join(ROUTER_NAMES)}")
    check_router_options(moe)
    _positive("model.moe.top_k", moe.top_k)
    if moe.top_k > moe.num_experts:
        raise ConfigError(f"model.moe.top_k: {moe.top_k} is more than model.moe.num_experts={moe.num_experts}")
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, key)
        if value is not None:
            _positive(f"model.moe.{key}", value)
        elif moe.router != "tc-softmax" and key == "capacity_factor":
            raise ConfigError(f"model.moe.capacity_factor: null (dropless) needs router tc-softmax, not {moe.router!r}")
    _choice("model.moe.routing", moe.routing, ROUTING_MODES)
    _choice("model.moe.pool", moe.pool, POOL_MODES)
    _positive("model.moe.group_size", moe.group_size)
    if moe.slots_per_expert is not None:
        _positive("model.moe.slots_per_expert", moe.slots_per_expert)
    _positive("model.moe.sinkhorn_iters", moe.sinkhorn_iters)
    _positive("model.moe.noise_std", moe.noise_std, allow_zero=True)
    for key in ("importance_loss", "load_loss", "switch_loss", "z_loss"):
        _positive(f"model.moe.{key}", getattr(moe, key), allow_zero=True)
    if moe.load_loss and not moe.noise_std:
        raise ConfigError("model.moe.load_loss: the smooth load loss needs model.moe.noise_std > 0")
    parse_layers(moe.layers, depth=None)
    if p.ep_size > 1 and moe.num_experts % p.ep_size:
        raise ConfigError(f"parallel.ep_size: {p.ep_size} does not divide model.moe.num_experts={moe.num_experts}")
    _choice("data.order", d.order, DATA_ORDERS)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    if not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {d.max_bad_fraction!r}")
    _positive("data.prefetch", d.prefetch)
    _positive("data.shuffle_buffer", d.shuffle_buffer, allow_zero=True)
    if not 0 < d.scale[0] <= d.scale[1] <= 1:
        raise ConfigError(f"data.scale: must be 0 < min <= max <= 1, got {list(d.scale)!r}")
    if not 0 <= d.hflip <= 1:
        raise ConfigError(f"data.hflip: must be a probability in [0, 1], got {d.hflip!r}")
    for key in ("mixup", "cutmix", "color_jitter"):
        _positive(f"data.{key}", getattr(d, key), allow_zero=True)
    if not 0 < d.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct: must be in (0, 1], got {d.crop_pct!r}")
    if any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: every value must be > 0, got {list(d.std)!r}")
    _choice("data.interpolation", d.interpolation, ("bicubic", "bilinear", "nearest", "random"))
    _positive("data.http_timeout_s", d.http_timeout_s)
    _positive("data.max_image_pixels", d.max_image_pixels)
    if not 0 <= cfg.metrics.port <= 65535:
        raise ConfigError(f"metrics.port: {cfg.metrics.port} is not a TCP port (0 turns the endpoint off)")
    if not cfg.metrics.addr.strip():
        raise ConfigError("metrics.addr: must name an interface to bind, e.g. 127.0.0.1 or 0.0.0.0")
    if not cfg.metrics.job.strip():
        raise ConfigError("metrics.job: must not be empty (it is the job label of every series)")
    gateway = cfg.metrics.pushgateway
    if gateway is not None and (
        not gateway.strip() or ("://" in gateway and not gateway.startswith(("http://", "https://")))
    ):
        raise ConfigError(f"metrics.pushgateway: {_show(gateway)} is neither an http(s) URL nor host:port")
    _positive("metrics.push_timeout_s", cfg.metrics.push_timeout_s)
    _validate_wandb(cfg.metrics.wandb)
    _validate_deepspeed(p.deepspeed)


WANDB_MODES = ("offline", "online", "disabled")


def _validate_wandb(w: WandbConfig) -> None:
    if w.mode is not None:
        _choice("metrics.wandb.mode", w.mode, WANDB_MODES)
    for key in ("project", "entity", "name", "group"):
        value = getattr(w, key)
        if value is not None and not value.strip():
            raise ConfigError(f"metrics.wandb.{key}: must not be empty (leave it out instead)")
    tags = w.tags
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"metrics.wandb.tags: expected a list of strings, got {_show(tags)}")


# Keys of the DeepSpeed config the trainer writes itself (parallel/ds_config.py): `parallel.deepspeed` may not set
# them. A path with a dot is a key inside a section; the rest of that section passes through.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.global_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.compute_grad_norm": "its grad_norm, reported in every log record",
    "fp16": "parallel.precision",
    "bf16": "parallel.precision",
    "amp": "parallel.precision",
    "torch_autocast": "parallel.precision",
    "data_types": "parallel.precision",
    "optimizer": "train.lr, train.weight_decay, train.betas (AdamW with layer decay)",
    "scheduler": "train.warmup_steps, train.min_lr (cosine)",
    "zero_allow_untested_optimizer": "its own optimizer, which needs it",
    "elasticity": "train.global_batch_size",
    "checkpoint": "run.resume and its own checkpoint layout",
}
DEEPSPEED_SECTIONS = ("parallel.deepspeed.zero_optimization",)  # written by the trainer too: merged key by key


def _validate_deepspeed(value: Any, key: str = "parallel.deepspeed") -> None:
    """`parallel.deepspeed`: JSON data (it is written to `deepspeed_config.json`) without a key the trainer owns; a
    section the trainer also writes (`zero_optimization`) must stay a mapping, so the two can be merged."""
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str) or not name or _CONTROL.search(name) or len(name) > 200:
                raise ConfigError(f"{key}: {_show(name)} is not a DeepSpeed config key")
            path = f"{key}.{name}"
            owner = DEEPSPEED_OWNED.get(path.removeprefix("parallel.deepspeed."))
            if owner is not None:
                raise ConfigError(f"{path}: the trainer writes this DeepSpeed setting itself (from {owner}); remove it")
            if path in DEEPSPEED_SECTIONS and not isinstance(item, dict):
                raise ConfigError(f"{path}: expected a mapping (merged into the trainer's own), got {_show(item)}")
            _validate_deepspeed(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _validate_deepspeed(item, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {_show(value)}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{key}: {_show(value)} is not a JSON value (string, number, boolean, null, list, mapping)")


def check_router_options(moe: MoEConfig) -> None:
    """An option the chosen router does not take (`sinkhorn_iters` with `tc-softmax`, `top_k` with `soft`) is an
    error rather than silently ignored; options are told apart from their defaults, since a resolved `config.yaml`
    holds every key."""
    takes = ROUTER_SPECS[moe.router].options
    defaults = MoEConfig()
    for name in ALL_ROUTER_OPTIONS:
        if name not in takes and getattr(moe, name) != getattr(defaults, name):
            raise ConfigError(
                f"model.moe.{name}: router {moe.router} does not take this option (it takes {', '.join(takes)}); "
                f"leave it at its default {getattr(defaults, name)!r} or choose a router that does"
            )


def router_option_resets(router: str, moe: MoEConfig) -> tuple[str, ...]:
    """`model.moe.KEY=default` overrides for every option of `moe` that `router` does not take and that differs from
    its default: what a command that switches a config's router (`vimoe study routers`) appends, so that the base
    config's options for another router do not trip `check_router_options`."""
    takes = ROUTER_SPECS[router].options
    defaults = MoEConfig()
    return tuple(
        f"model.moe.{name}={json.dumps(getattr(defaults, name))}"
        for name in ALL_ROUTER_OPTIONS
        if name not in takes and getattr(moe, name) != getattr(defaults, name)
    )


def check_layout(cfg: Config, world: int) -> None:
    """The parallel layout must divide evenly on `world` ranks; the trainer checks it before the rendezvous and the
    launchers before they start any rank."""
    if world % cfg.parallel.ep_size:
        raise ConfigError(f"parallel.ep_size: {cfg.parallel.ep_size} does not divide the world size {world}")
    micro_batch_size(cfg, world)


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Images per rank per forward, train.global_batch_size / (world_size x train.grad_accum): the one definition (the
    data loaders, the DeepSpeed config and the layout check read it here). Routing groups never span ranks, so it
    must be a multiple of model.moe.group_size."""
    t, group = cfg.train, cfg.model.moe.group_size
    if t.global_batch_size % (world_size * t.grad_accum):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {t.grad_accum}"
        )
    micro = t.global_batch_size // (world_size * t.grad_accum)
    if micro % group:
        raise ConfigError(
            f"model.moe.group_size: {group} does not divide the per-rank micro-batch of {micro} images "
            f"(train.global_batch_size {t.global_batch_size} / {world_size} ranks / {t.grad_accum} accumulation)"
        )
    return micro


def parse_layers(layers: Any, depth: int | None) -> list[int]:
    """`last-L` or a list of block indices -> sorted block indices; checked against `depth` when given."""
    key = "model.moe.layers"
    if isinstance(layers, str):
        if not re.fullmatch(r"last-[0-9]{1,6}", layers):  # ASCII digits: str.isdigit() also takes '²'
            raise ConfigError(f"{key}: {_show(layers)} is neither 'last-L' nor a list of block indices")
        num = int(layers[5:])
        if depth is None:
            return []
        if num > depth:
            raise ConfigError(f"{key}: {layers!r} asks for more MoE blocks than the backbone's depth {depth}")
        return list(range(depth - num, depth))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"{key}: {_show(layers)} is neither 'last-L' nor a list of block indices")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{key}: {_show(list(layers))} names a block twice")
    if depth is not None:
        bad = [i for i in layers if not -depth <= i < depth]
        if bad:
            raise ConfigError(f"{key}: block {bad[0]} is beyond the backbone's depth {depth}")
        return sorted(i % depth for i in layers)
    return sorted(layers)


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
