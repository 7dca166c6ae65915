"""`validate`: the checks of a whole config that need no model and no world size, run by `load_config` once the
dataclasses are built. The bounds of each number come first (bounds.py); then the choices (ROUTING_MODES,
PRECISIONS, ...), the checks across keys (top_k against num_experts, ep_size dividing num_experts), the chosen
router's options (`check_router_options`: an option it does not take is an error, `router_option_resets` undoes
such options when a command switches routers), `metrics.wandb` and `parallel.deepspeed` (JSON data without a key the
trainer writes itself: DEEPSPEED_OWNED).
"""

from __future__ import annotations

import json
import math
from typing import Any

from vimoe_dist.config.bounds import _INT64, BOUNDS, Bound, _check_bounds, _check_number
from vimoe_dist.config.coerce import _CONTROL, _show
from vimoe_dist.config.derived import parse_layers
from vimoe_dist.config.schema import Config, ConfigError, MoEConfig, WandbConfig
from vimoe_dist.model.moe.registry import ALL_ROUTER_OPTIONS, ROUTER_NAMES, ROUTER_SPECS

ROUTING_MODES = ("image", "token")
POOL_MODES = ("cls", "mean")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_ORDERS = ("stream", "exact")


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
