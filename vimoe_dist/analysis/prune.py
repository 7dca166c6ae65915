"""Turning MoE layers back into dense FFNs: the "remove the redundant layers" step of ViMoE (Han et al. 2024, Sec. 4).

Two ways to replace an MoE FFN y = S(x) + sum_i g_i(x) E_i(x) (S the shared expert, when there is one):

- `shared`: keep S alone. The routed part is dropped; what the shared expert learnt (the common knowledge, in the
  paper's words) stays.
- `average`: replace the routed part by one averaged expert, its parameters the load-weighted average of the
  experts' (weights: each expert's share of the combine weight on the validation set) and its output scaled by the
  mean total gate a token received, so that an expert the router hardly used hardly counts. With a shared expert the
  sum S(x) + avg(x) is still exactly one timm `Mlp`: its hidden layer is the two hidden layers side by side, fc2
  reads both, and the output biases add.

The result is a plain ViT block FFN (timm `Mlp`), so the pruned model is a ViMoE with fewer MoE layers
(`model.moe.layers` = the kept ones) and trains on from the written state dict.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from timm.layers import Mlp
from torch import nn

from vimoe_dist.errors import UserError

MODES = ("shared", "average")


@torch.no_grad()
def averaged_expert(layer: nn.Module, gate_E: torch.Tensor) -> Mlp:
    """One `Mlp` standing for the routed experts: parameters averaged with weights gate_E / sum(gate_E), output
    scaled by sum(gate_E). `gate_E` is the mean combine weight per token of each expert."""
    bank = layer.experts
    gate = gate_E.to(torch.float64).clamp_min(0)
    total = float(gate.sum())
    if total <= 0:
        raise UserError("prune --mode average: the router sent no token to any expert on the data; use --mode shared")
    w = (gate / total).to(bank.fc1_weight.dtype)
    mlp = Mlp(bank.dim, bank.hidden_dim)
    mlp.act = copy.deepcopy(bank.act)
    mlp.fc1.weight.copy_(torch.einsum("e,ehd->hd", w, bank.fc1_weight))
    mlp.fc1.bias.copy_(w @ bank.fc1_bias)
    mlp.fc2.weight.copy_(torch.einsum("e,edh->dh", w, bank.fc2_weight) * total)
    mlp.fc2.bias.copy_((w @ bank.fc2_bias) * total)
    return mlp


@torch.no_grad()
def concat_mlps(a: Mlp, b: Mlp) -> Mlp:
    """One `Mlp` computing a(x) + b(x): hidden units side by side (exact for elementwise activations)."""
    dim = a.fc1.in_features
    mlp = Mlp(dim, a.fc1.out_features + b.fc1.out_features)
    mlp.act = copy.deepcopy(a.act)
    mlp.fc1.weight.copy_(torch.cat([a.fc1.weight, b.fc1.weight], 0))
    mlp.fc1.bias.copy_(torch.cat([a.fc1.bias, b.fc1.bias]))
    mlp.fc2.weight.copy_(torch.cat([a.fc2.weight, b.fc2.weight], 1))
    mlp.fc2.bias.copy_(a.fc2.bias + b.fc2.bias)
    return mlp


def dense_ffn(layer: nn.Module, mode: str, gate_E: torch.Tensor | None = None) -> Mlp:
    """The dense FFN that replaces MoE FFN `layer` (see the module docstring)."""
    if mode not in MODES:
        raise UserError(f"prune --mode: {mode!r} is not one of {', '.join(MODES)}")
    if not hasattr(layer, "experts") or not hasattr(layer.experts, "fc1_weight"):
        raise UserError(f"prune: {type(layer).__name__} is not a ViMoE MoE FFN (MoEFFN)")
    shared = layer.shared
    if mode == "shared":
        if shared is None:
            raise UserError(
                "prune --mode shared: the model has no shared expert (model.moe.shared_expert=false); "
                "use --mode average"
            )
        return copy.deepcopy(shared)
    if gate_E is None:
        raise UserError("prune --mode average needs the experts' load from the validation data")
    avg = averaged_expert(layer, gate_E)
    return avg if shared is None else concat_mlps(shared, avg)


def parse_keep_layers(text: str, moe_blocks: list[int]) -> list[int]:
    """`--keep-layers 9,11` (or `none`) -> sorted block indices, each an MoE block of the model."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return []
    try:
        keep = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--keep-layers: {text!r} is not a comma-separated list of block indices (or 'none')") from None
    bad = [b for b in keep if b not in moe_blocks]
    if bad:
        raise UserError(
            f"--keep-layers: block {bad[0]} is not an MoE block; MoE blocks: {', '.join(map(str, moe_blocks))}"
        )
    return keep


def prune_model(
    model: nn.Module, keep: list[int], mode: str, gates: dict[int, torch.Tensor] | None = None
) -> list[int]:
    """Replaces every MoE FFN not in `keep` by its dense FFN, in place; returns the pruned block indices."""
    from vimoe_dist.model import moe_layers

    pruned = []
    for block, layer in moe_layers(model).items():
        if block in keep:
            continue
        ffn = dense_ffn(layer, mode, None if gates is None else gates.get(block))
        model.blocks[block].mlp = ffn.to(next(layer.parameters()).device)
        pruned.append(block)
    return pruned


def dense_ffn_sizes(model: nn.Module) -> dict[int, int]:
    """Block -> hidden size of every dense (timm `Mlp`) block FFN. A block pruned with `average` next to a shared
    expert holds both hidden layers and is wider than the backbone's."""
    return {i: b.mlp.fc1.out_features for i, b in enumerate(model.blocks) if isinstance(b.mlp, Mlp)}


@torch.no_grad()
def fit_dense_ffns(model: nn.Module, sizes: dict[int, int]) -> list[int]:
    """Rebuilds the dense FFN of each block in `sizes` whose hidden size differs (fresh weights, to be loaded), so
    that a state dict written by `vimoe prune` fits; returns the blocks it changed."""
    changed = []
    for i, hidden in sorted(sizes.items()):
        mlp = model.blocks[i].mlp
        if not isinstance(mlp, Mlp):
            continue  # an MoE block in this config: the state dict's keys decide whether it fits
        if mlp.fc1.out_features == hidden:
            continue
        wide = Mlp(mlp.fc1.in_features, hidden, mlp.fc2.out_features)
        wide.act = copy.deepcopy(mlp.act)
        model.blocks[i].mlp = wide
        changed.append(i)
    return changed


def read_dense_ffn_sizes(path: str | Path) -> dict[int, int]:
    """The `dense_ffn_hidden` metadata `save_pruned` writes into the safetensors file ({} for any other file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {int(k): int(v) for k, v in json.loads(meta.get("dense_ffn_hidden", "{}")).items()}


def save_pruned(model: nn.Module, out_dir: str | Path) -> Path:
    """The single-device state dict as `model.safetensors` (what `model.pretrained` loads), with the hidden size of
    every dense block FFN in its metadata (`dense_ffn_hidden`, for `fit_dense_ffns`)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    meta = {"format": "vimoe", "dense_ffn_hidden": json.dumps({str(k): v for k, v in dense_ffn_sizes(model).items()})}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path
