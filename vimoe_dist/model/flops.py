"""Model FLOPs of a ViMoE per image, read off the modules: what MFU and achieved FLOP/s are computed from.

Conventions (those of Kaplan et al. 2020 and of PaLM's MFU, Chowdhery et al. 2022, appendix B):
- a multiply-add is 2 FLOPs; counted are the matrix products (linear layers, the patch-embedding convolution, the
  attention products Q K^T and A V, Soft MoE's dispatch and combine products); element-wise work (GELU, softmax,
  LayerNorm, residual adds, combine weights, biases) is not, as in `torch.utils.flop_counter.FlopCounterMode`;
- *model* FLOPs: what the model needs, not what the hardware ran (no activation recomputation, no padding);
- training = `TRAIN_FLOPS_PER_FORWARD` (3) x forward: the backward computes a gradient for the input and one for the
  weights of every product, each costing the forward's FLOPs. (The patch embedding's input gradient is never
  computed because images need none, so the real count is 3 x forward minus one patch embedding: 0.3% of ViT-S/14.)

Per image, with N tokens (patches + class and register tokens), model dim D, FFN hidden H, E experts:
- patch embedding: 2 * patches * (C * p * p) * D;
- attention per block: 2 * N * D * 3D (qkv) + 2 * N * D * D (projection), plus the N^2 terms 2 * 2 * N^2 * D;
- dense FFN: 2 * 2 * N * D * H; the shared expert the same;
- router: 2 * units * D * E (units: 1 per image under image routing, N under token routing);
- routed experts: 2 * 2 * D * H per row the experts compute. Rows depend on the routing: `expert_flops` takes the
  per-expert row counts an MoE layer reports in `last_stats["tokens"]` (real rows, drops included), and
  `nominal_expert_rows` gives what the configuration implies (k * N for token choice, capacity slots for expert
  choice and Soft MoE);
- Soft MoE adds its slot mixing, 2 * 2 * N * D * E * S per image (dispatch and combine), and its router is
  2 * units * D * E * S;
- classifier head: 2 * D * K on the pooled token.

Under expert parallelism the row counts of a rank are those of its own images over all (global) experts, so the
FLOPs here are the model FLOPs of the rank's images wherever their experts ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vimoe_dist.model.moe.layer import MoEFFN
from vimoe_dist.model.moe.routers import capacity
from vimoe_dist.model.moe.routers.common import LinearGate
from vimoe_dist.model.moe.routers.expert_choice import ExpertChoice
from vimoe_dist.model.moe.routers.soft import SoftMoE
from vimoe_dist.model.moe.routers.token_choice import TokenChoiceTopK

TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per image, by part (routed experts at the rows they were computed for)."""

    patch_embed: float
    attention: float  # the linear layers of attention (qkv, projection)
    attention_scores: float  # Q K^T and A V: the N^2 terms
    dense_ffn: float
    shared_expert: float
    router: float
    soft_mixing: float
    routed_experts: float
    head: float

    @property
    def fixed(self) -> float:
        """Everything but the routed experts: what does not depend on the routing."""
        return self.forward - self.routed_experts

    @property
    def forward(self) -> float:
        return float(sum(asdict(self).values()))

    @property
    def training(self) -> float:
        return TRAIN_FLOPS_PER_FORWARD * self.forward

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "forward": self.forward, "training": self.training}


def tokens_per_image(model: nn.Module) -> int:
    """N: patches at the model's image size plus its prefix (class and register) tokens."""
    return int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 0))


def model_flops(model: nn.Module, expert_rows_per_image: Mapping[int, float] | None = None) -> ModelFlops:
    """Forward FLOPs per image of a timm VisionTransformer whose FFNs may be MoE FFNs (ours, wrapped or not).

    Args:
        model: the model (`build_model`'s, or the same after `parallelize`).
        expert_rows_per_image: block index -> rows the routed experts computed per image in that block; missing
            blocks (or None) take `nominal_expert_rows`.
    """
    N = tokens_per_image(model)
    parts = dict.fromkeys(ModelFlops.__dataclass_fields__, 0.0)
    parts["patch_embed"] = _patch_embed_flops(model.patch_embed)
    nominal = nominal_expert_rows(model)
    rows = {**nominal, **(expert_rows_per_image or {})}
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if attn is None or not hasattr(attn, "num_heads"):
            raise ValueError(f"flops: block {i} ({type(block).__name__}) has no timm attention to count")
        parts["attention"] += _linear_flops(attn, N)
        parts["attention_scores"] += 2 * 2 * N * N * attn.num_heads * attn.head_dim
        moe = find_moe(block.mlp, i)
        if moe is None:
            parts["dense_ffn"] += _linear_flops(block.mlp, N)
            continue
        units = 1 if moe.routing == "image" else N
        if isinstance(moe.router, SoftMoE):
            slots = moe.num_experts * moe.router.slots_per_expert
            parts["router"] += 2 * units * moe.experts.dim * slots
            parts["soft_mixing"] += 2 * 2 * N * moe.experts.dim * slots
        else:
            parts["router"] += _linear_flops(moe.router, units)
        if moe.shared is not None:
            parts["shared_expert"] += _linear_flops(moe.shared, N)
        parts["routed_experts"] += rows[i] * _expert_row_flops(moe)
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("flops: attention-pooling heads (global_pool 'map') are not counted")
    head_rows = 1 if getattr(model, "global_pool", "token") else N
    parts["head"] = _linear_flops(model.head, head_rows)
    return ModelFlops(**parts)


def nominal_expert_rows(model: nn.Module) -> dict[int, float]:
    """Block index -> rows per image the routed experts compute as configured (training capacity).

    Token choice: k * N (each token, or each image's N tokens, to k experts), an upper bound that capacity drops
    lower; expert choice: every expert fills its C = ceil(k U cf / E) slots of each group of U units; Soft MoE:
    E * S slots per group. A group holds `group_size` images.
    """
    N = tokens_per_image(model)
    out: dict[int, float] = {}
    for i, block in enumerate(model.blocks):
        moe = find_moe(block.mlp, i)
        if moe is None:
            continue
        image = moe.routing == "image"
        units, rows_per_unit = (moe.group_size, N) if image else (moe.group_size * N, 1)
        router, E = moe.router, moe.num_experts
        if isinstance(router, SoftMoE):
            slots = E * router.slots_per_expert
        elif isinstance(router, ExpertChoice):
            slots = E * capacity(units, E, router.top_k, router.capacity_factor, router.min_capacity)
        elif isinstance(router, TokenChoiceTopK):
            slots = router.top_k * units
        else:
            raise ValueError(f"flops: block {i}: no nominal row count for router {type(router).__name__}")
        out[i] = slots * rows_per_unit / moe.group_size
    return out


def expert_flops(model: nn.Module, rows_by_block: Mapping[int, Sequence[int] | torch.Tensor]) -> float:
    """Forward FLOPs of the routed experts for these rows: block index -> rows per expert, e.g. the
    `last_stats["tokens"]` of each MoE layer (`last_expert_rows`). Rows of a batch give the batch's FLOPs."""
    total = 0.0
    for i, rows in rows_by_block.items():
        moe = find_moe(model.blocks[i].mlp, i)
        if moe is None:
            raise ValueError(f"flops: block {i} has no MoE FFN, but expert rows were given for it")
        count = rows.sum().item() if torch.is_tensor(rows) else sum(rows)
        total += float(count) * _expert_row_flops(moe)
    return total


def last_expert_rows(model: nn.Module) -> dict[int, list[int]]:
    """Block index -> rows per (global) expert of the last forward, from the MoE layers' `last_stats`."""
    out = {}
    for i, block in enumerate(model.blocks):
        moe = find_moe(block.mlp, i)
        if moe is not None and "tokens" in moe.last_stats:
            out[i] = [int(n) for n in moe.last_stats["tokens"].tolist()]
    return out


def find_moe(mlp: nn.Module, block: int) -> MoEFFN | None:
    """Our MoE FFN inside a block's FFN slot (it may be wrapped, e.g. by the DeepSpeed adapter), or None for a
    dense FFN. Another library's MoE layer is refused: its linear layers are not per-token work."""
    for m in mlp.modules():
        if isinstance(m, MoEFFN):
            return m
    if hasattr(mlp, "aux_loss"):
        raise ValueError(
            f"flops: block {block}: {type(mlp).__name__} is counted only for ViMoE's own MoE layer (MoEFFN)"
        )
    return None


def _expert_row_flops(moe: MoEFFN) -> int:
    """One row through one expert: fc1 (D -> H) and fc2 (H -> D)."""
    return 2 * 2 * moe.experts.dim * moe.experts.hidden_dim


def _linear_flops(module: nn.Module, rows: int) -> int:
    """2 * rows * in * out for every linear layer in `module` (each sees `rows` rows per image); the fp32 router
    gate (`weight` [E, D]) counts as one too."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += 2 * rows * m.in_features * m.out_features
        elif isinstance(m, LinearGate):
            total += 2 * rows * m.weight.numel()
    return total


def _patch_embed_flops(patch_embed: nn.Module) -> int:
    conv = patch_embed.proj
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"flops: the patch embedding is a {type(conv).__name__}, not a convolution")
    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * int(patch_embed.num_patches) * per_output * conv.out_channels
