"""The one place where config becomes modules: `build_model`, `upcycle`, `build_moe`.

A ViMoE is a timm VisionTransformer (any timm ViT name: DINOv2 variants with layer scale and registers included)
whose FFN in the chosen blocks is an MoE FFN. Starting from dense weights goes through function-preserving
upcycling: every expert (and the shared expert) starts as a copy of the block's FFN, so the new model computes what
the dense one did and training starts from the DINOv2 features instead of from noise.

The MoE FFN is built by a layer factory, `build_moe` unless another is passed (timm's `mlp_layer` idea): the parity
tests and `vimoe bench moe` pass DeepSpeed's and fairscale's layers (`vimoe_dist.parallel.reference`) that way, so
this package never imports them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Protocol

import timm
import torch
from timm.layers import Mlp
from torch import nn

from vimoe_dist.config import ConfigError, ModelConfig, MoEConfig, parse_layers
from vimoe_dist.model.moe.layer import MoEFFN, MoELayer
from vimoe_dist.model.moe.routers import build_router, router_options
from vimoe_dist.model.safetensors_file import safetensors_problem

log = logging.getLogger(__name__)


class MoELayerFactory(Protocol):
    """Builds an MoE FFN in place of a block's timm `Mlp`: `build_moe`, or a reference layer for comparisons."""

    def __call__(
        self, dim: int, hidden_dim: int, moe_cfg: MoEConfig, num_prefix_tokens: int = 1, num_tokens: int | None = None
    ) -> nn.Module: ...


def build_moe(
    dim: int, hidden_dim: int, moe_cfg: MoEConfig, num_prefix_tokens: int = 1, num_tokens: int | None = None
) -> nn.Module:
    """An MoE FFN, drop-in for timm's `Mlp`: forward(x [B, N, D]) -> [B, N, D]; aux loss in `.aux_loss`.
    `num_tokens` (N, when known) sizes routers whose parameters depend on the units per group (Soft MoE's slots)."""
    options = {k: getattr(moe_cfg, k) for k in router_options(moe_cfg.router) if hasattr(moe_cfg, k)}
    units = moe_cfg.group_size if moe_cfg.routing == "image" else num_tokens and moe_cfg.group_size * num_tokens
    try:
        router = build_router(moe_cfg.router, dim, moe_cfg.num_experts, num_units=units, **options)
    except ValueError as e:  # the router's message names its option, which is a model.moe key
        raise ConfigError(f"model.moe.{e}") from None
    return MoEFFN(
        dim,
        hidden_dim,
        moe_cfg.num_experts,
        router,
        routing=moe_cfg.routing,
        pool=moe_cfg.pool,
        group_size=moe_cfg.group_size,
        shared_expert=moe_cfg.shared_expert,
        num_prefix_tokens=num_prefix_tokens,
    )


def upcycle(
    vit: nn.Module, moe_cfg: MoEConfig, copy_ffn: bool = True, moe_layer: MoELayerFactory = build_moe
) -> nn.Module:
    """Turns a dense timm VisionTransformer into a ViMoE, in place, and returns it.

    With `copy_ffn`, each replaced block's FFN is copied into every expert and the shared expert. Function
    preserving: with a shared expert, y = S(x) + sum_i g_i E_i(x), and halving the output projection of each copy
    gives y = FFN(x) whenever the routing weights of a token sum to one and nothing is dropped; without one, the
    copies are exact. Without `copy_ffn` the experts get a fresh independent init (training from scratch).
    `moe_layer` builds each MoE FFN (copying needs ours).
    """
    depth = len(vit.blocks)
    layers = parse_layers(moe_cfg.layers, depth)
    num_prefix = getattr(vit, "num_prefix_tokens", 1)
    patches = getattr(getattr(vit, "patch_embed", None), "num_patches", None)
    num_tokens = patches + num_prefix if patches else None
    for i in layers:
        mlp = vit.blocks[i].mlp
        if not isinstance(mlp, Mlp) or not isinstance(mlp.act, nn.GELU) or not isinstance(mlp.norm, nn.Identity):
            raise ConfigError(f"model.moe.layers: block {i} has a {type(mlp).__name__} FFN; MoE needs a timm GELU Mlp")
        dim, hidden = mlp.fc1.in_features, mlp.fc1.out_features
        if moe_cfg.hidden_ratio is not None:
            if copy_ffn and round(moe_cfg.hidden_ratio * dim) != hidden:
                raise ConfigError(f"model.moe.hidden_ratio: {moe_cfg.hidden_ratio} differs from the dense FFN's")
            hidden = round(moe_cfg.hidden_ratio * dim)
        moe = moe_layer(dim, hidden, moe_cfg, num_prefix_tokens=num_prefix, num_tokens=num_tokens)
        if copy_ffn:
            _copy_ffn_into(moe, mlp)
        vit.blocks[i].mlp = moe
    return vit


@torch.no_grad()
def _copy_ffn_into(moe: nn.Module, mlp: Mlp) -> None:
    if not isinstance(moe, MoEFFN):
        raise TypeError(f"upcycling copies the dense FFN into MoEFFN experts, not into a {type(moe).__name__}")
    scale = 0.5 if moe.shared is not None else 1.0
    moe.experts.copy_from_mlp(mlp, out_scale=scale)
    if moe.shared is not None:
        moe.shared.load_state_dict(mlp.state_dict())
        moe.shared.fc2.weight.mul_(0.5)
        moe.shared.fc2.bias.mul_(0.5)


def build_dense(model_cfg: ModelConfig) -> nn.Module:
    """The timm ViT backbone, without pretrained weights (they come from a file through `load_pretrained`)."""
    kwargs = dict(model_cfg.backbone_kwargs)
    try:
        vit = timm.create_model(
            model_cfg.backbone,
            pretrained=False,
            img_size=model_cfg.img_size,
            in_chans=model_cfg.in_chans,
            num_classes=model_cfg.num_classes,
            drop_path_rate=model_cfg.drop_path,
            global_pool=model_cfg.global_pool,
            **kwargs,
        )
    except RuntimeError as e:  # timm: unknown model name
        raise ConfigError(f"model.backbone: {model_cfg.backbone!r}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"model.backbone_kwargs: {kwargs!r} not accepted by {model_cfg.backbone}: {e}") from None
    resize_dense_ffns(vit, model_cfg.dense_ffn_hidden)
    return vit


def resize_dense_ffns(vit: nn.Module, hidden_by_block: dict[int, int]) -> None:
    """Gives the listed blocks a dense FFN of another hidden size (fresh weights, to be loaded): a block that
    `vimoe prune --mode average` turned dense next to a shared expert holds both hidden layers."""
    depth = len(vit.blocks)
    for block, hidden in sorted(hidden_by_block.items()):
        if not -depth <= block < depth:
            raise ConfigError(f"model.dense_ffn_hidden: block {block} is beyond the backbone's depth {depth}")
        mlp = vit.blocks[block].mlp
        if isinstance(mlp, Mlp) and mlp.fc1.out_features != hidden:
            vit.blocks[block].mlp = Mlp(mlp.fc1.in_features, hidden, mlp.fc2.out_features, act_layer=type(mlp.act))


def build_model(
    model_cfg: ModelConfig, trust_checkpoint: bool = False, moe_layer: MoELayerFactory = build_moe
) -> nn.Module:
    """Config -> ViMoE. forward(images [B, 3, H, W]) -> logits [B, num_classes].

    `model.pretrained` may be a dense timm/DINOv2 checkpoint file (upcycled), a ViMoE state dict written by
    `vimoe export` or `vimoe prune` (loaded as is), or, when the machine is online, a timm model name. `moe_layer`
    builds each MoE FFN (`build_moe`: ours).
    """
    vit = build_dense(model_cfg)
    moe_cfg = model_cfg.moe
    source = model_cfg.pretrained
    if source is None:
        return upcycle(vit, moe_cfg, copy_ffn=False, moe_layer=moe_layer)
    state = load_state_dict_file(source, trust_checkpoint) if Path(source).exists() else None
    if state is None:
        if "/" in source or source.endswith((".pth", ".pt", ".bin", ".safetensors")):
            raise ConfigError(f"model.pretrained: file {source!r} does not exist")
        state = _timm_hub_state_dict(source, vit)
    if any(".experts.fc1_weight" in k for k in state):
        model = upcycle(vit, moe_cfg, copy_ffn=False, moe_layer=moe_layer)
        _load_matching(model, state, source, strict_moe=True)
        return model
    state = timm.models.vision_transformer.checkpoint_filter_fn(state, vit)
    _load_matching(vit, state, source, strict_moe=False)
    return upcycle(vit, moe_cfg, copy_ffn=True, moe_layer=moe_layer)


def load_state_dict_file(
    path: str | Path, trust_checkpoint: bool = False, what: str = "model.pretrained"
) -> dict[str, torch.Tensor]:
    """Reads weights we did not write safely: safetensors, or torch.load(weights_only=True) unless trusted.

    Raises:
        ConfigError: one line starting with `what` (the key or option that named the file), naming the tensor a
            truncated safetensors file cut off.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        problem = safetensors_problem(path)
        if problem:
            raise ConfigError(f"{what}: {str(path)!r} {problem}")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{what}: cannot load {str(path)!r}: {first}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:  # a pickle with objects, a truncated file, not a checkpoint at all
        hint = "" if trust_checkpoint else " (if you trust it, pass run.trust_checkpoint=true)"
        raise ConfigError(f"{what}: cannot load {str(path)!r}: {type(e).__name__}{hint}") from None
    for key in ("model", "state_dict", "module", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: {str(path)!r} holds no state dict")
    # DINOv2 teacher checkpoints prefix the backbone
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _timm_hub_state_dict(name: str, like: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a timm model name from the hub (needs network access)."""
    try:
        dense = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:
        raise ConfigError(f"model.pretrained: {name!r} is no file and could not be fetched from timm: {e}") from None
    return dense.state_dict()


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, strict_moe: bool) -> None:
    """Loads what fits; a classifier head of another size is skipped with a warning (fine-tuning on new classes)."""
    own = model.state_dict()
    state = dict(state)
    for key in [k for k in state if k.startswith("head.")]:
        if key in own and own[key].shape != state[key].shape:
            warnings.warn(
                f"model.pretrained: {key} has shape {tuple(state[key].shape)}, the model's is "
                f"{tuple(own[key].shape)}: the head stays freshly initialised",
                stacklevel=2,
            )
            del state[key]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(
            f"model.pretrained: {source!r} does not fit the model: {k} is {tuple(state[k].shape)}, "
            f"the model's is {tuple(own[k].shape)}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if strict_moe and (missing or unexpected):
        k = (missing or unexpected)[0]
        raise ConfigError(
            f"model.pretrained: {source!r} does not fit the model: {'missing' if missing else 'unexpected'} key {k}"
        )
    if missing:
        log.warning("model.pretrained: %d keys not in %s (e.g. %s)", len(missing), source, missing[0])


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """Block index -> MoE FFN, in block order; the same before and after `vimoe_dist.parallel.parallelize`, which
    wraps each MoE FFN in a module of its own (the FFN is then found inside the block's FFN module)."""
    layers = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        found = next((m for m in block.mlp.modules() if isinstance(m, MoELayer)), None)
        if found is not None:
            layers[i] = found
    return layers


def aux_loss(layers: dict[int, MoELayer] | nn.Module) -> torch.Tensor:
    """The auxiliary loss of the last forward, summed over the MoE layers (of a model, or given), in fp32: the one
    definition the trainer, the benchmarks and the tests add to the task loss."""
    layers = moe_layers(layers) if isinstance(layers, nn.Module) else layers
    losses = [m.aux_loss.float() for m in layers.values()]
    return torch.stack(losses).sum() if losses else torch.zeros(())
