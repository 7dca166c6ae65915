"""The configuration schema: dataclasses, YAML loading, dot-list overrides and validation.

One YAML file holds a run; `configs/*.yaml` may start with `base: other.yaml` to overlay another file. Overrides on
the command line use the same dotted paths (`model.moe.num_experts=16`); their values are parsed as YAML scalars.
Every bad key or value raises `ConfigError`, a one-line `ValueError` that names the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vimoe_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message is one line naming the key."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto: continue from the latest checkpoint in out_dir; never; or a checkpoint directory
    trust_checkpoint: bool = False  # allow torch.load without weights_only for files we did not write


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
    impl: str = "vimoe"  # vimoe | deepspeed | fairscale
    hidden_ratio: float | None = None  # expert hidden size / dim; None: the backbone's mlp_ratio
    # router options (each router reads the ones it knows; see routers/__init__.py)
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
    order: str = "stream"  # stream | exact
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


@dataclass
class MetricsConfig:
    port: int = 0  # 0: no Prometheus endpoint; rank r serves on port + LOCAL_RANK
    addr: str = "127.0.0.1"  # loopback by default: the endpoint is unauthenticated
    port_search: bool = False  # a taken port: try the next ones (logged) instead of failing
    pushgateway: str | None = None  # http(s)://host:port or host:port; each rank pushes its final values at exit
    push_timeout_s: float = 10.0
    job: str = "vimoe"  # the `job` label of every series


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
    """Reads a YAML file (following `base:` overlays), applies `key=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml_with_bases(Path(path), seen=())
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value); values are YAML scalars or flow collections."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted config key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r} ({_first_line(e)})") from None
    return key, value


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
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
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known in {where}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


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
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")


# -------------------------------------------------------------------------------------------- validation

# the registry's names (vimoe_dist/model/moe/routers/__init__.py; a test keeps the two equal): listed here so that
# validating a config, e.g. on a login node before `vimoe launch`, does not import torch
ROUTER_NAMES = ("ec-sinkhorn", "ec-softmax", "ec-sparse", "soft", "tc-sinkhorn", "tc-softmax")
ROUTING_MODES = ("image", "token")
POOL_MODES = ("cls", "mean")
IMPLS = ("vimoe", "deepspeed", "fairscale")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_ORDERS = ("stream", "exact")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    """Checks that need no model or world size; layer indices are checked against depth in build_model."""
    t, p, m, moe, d = cfg.train, cfg.parallel, cfg.model, cfg.model.moe, cfg.data
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
            raise ConfigError(f"model.dense_ffn_hidden: {block!r}: {hidden!r} is not block index: hidden size")
    if not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.drop_path: must be in [0, 1), got {m.drop_path!r}")
    _positive("model.moe.num_experts", moe.num_experts)
    if moe.router not in ROUTER_NAMES:
        raise ConfigError(f"model.moe.router: unknown router {moe.router!r}; known: {', '.join(ROUTER_NAMES)}")
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
    _choice("model.moe.impl", moe.impl, IMPLS)
    _positive("model.moe.group_size", moe.group_size)
    if moe.slots_per_expert is not None:
        _positive("model.moe.slots_per_expert", moe.slots_per_expert)
    _positive("model.moe.sinkhorn_iters", moe.sinkhorn_iters)
    _positive("model.moe.noise_std", moe.noise_std, allow_zero=True)
    for key in ("importance_loss", "load_loss", "switch_loss", "z_loss"):
        _positive(f"model.moe.{key}", getattr(moe, key), allow_zero=True)
    if moe.load_loss and not moe.noise_std:
        raise ConfigError("model.moe.load_loss: the smooth load loss needs model.moe.noise_std > 0")
    if moe.impl != "vimoe":
        if moe.router != "tc-softmax" or moe.top_k not in (1, 2):
            raise ConfigError(f"model.moe.impl: {moe.impl!r} supports only router tc-softmax with top_k 1 or 2")
        if moe.routing != "token":
            raise ConfigError(f"model.moe.impl: {moe.impl!r} routes tokens; set model.moe.routing=token")
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
        raise ConfigError(f"metrics.pushgateway: {gateway!r} is neither an http(s) URL nor host:port")
    _positive("metrics.push_timeout_s", cfg.metrics.push_timeout_s)


def check_layout(cfg: Config, world: int) -> None:
    """The parallel layout must divide evenly on `world` ranks; the trainer checks it before any work starts and the
    launchers before they start any rank."""
    p, t, moe = cfg.parallel, cfg.train, cfg.model.moe
    if world % p.ep_size:
        raise ConfigError(f"parallel.ep_size: {p.ep_size} does not divide the world size {world}")
    if t.global_batch_size % (world * t.grad_accum):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by world size {world} x "
            f"train.grad_accum {t.grad_accum}"
        )
    micro = t.global_batch_size // (world * t.grad_accum)
    if micro % moe.group_size:
        raise ConfigError(
            f"model.moe.group_size: {moe.group_size} does not divide the per-rank micro-batch of {micro} images "
            f"(train.global_batch_size {t.global_batch_size} / {world} ranks / {t.grad_accum} accumulation)"
        )


def parse_layers(layers: Any, depth: int | None) -> list[int]:
    """`last-L` or a list of block indices -> sorted block indices; checked against `depth` when given."""
    key = "model.moe.layers"
    if isinstance(layers, str):
        if not layers.startswith("last-") or not layers[5:].isdigit():
            raise ConfigError(f"{key}: {layers!r} is neither 'last-L' nor a list of block indices")
        num = int(layers[5:])
        if depth is None:
            return []
        if num > depth:
            raise ConfigError(f"{key}: {layers!r} asks for more MoE blocks than the backbone's depth {depth}")
        return list(range(depth - num, depth))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"{key}: {layers!r} is neither 'last-L' nor a list of block indices")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{key}: {list(layers)!r} names a block twice")
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
