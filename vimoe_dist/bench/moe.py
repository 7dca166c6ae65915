"""`vimoe bench moe`: forward + backward of one MoE FFN at ViT-S sizes (dim 384, hidden 1536, 8 experts, 32 images
of 196 tokens, token routing) for every router and for DeepSpeed's and fairscale's layers, against a dense FFN doing
k times the work (k x T tokens through one timm Mlp), all in one interleaved run.

`ratio_vs_dense` = time(dense on k x T tokens) / time(layer): 1.0 means the layer costs exactly its expert FLOPs.
`expert_rows` = rows the experts processed: below k x T where capacity dropped tokens (then the ratio flatters the
layer), above it where buffers are padded (DeepSpeed, fairscale); the dropless rows are the like-for-like measure.
Soft MoE processes E x slots rows per group whatever T is, so its ratio compares different work.
`speedup_vs_deepspeed` = time(DeepSpeed's layer at the same k) / time(layer).
Both ratios are medians of per-round ratios (bench/timing.py): robust to the host's speed drifting between rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from timm.layers import Mlp

from vimoe_dist.bench.timing import interleaved_samples, paired_ratio, print_table, write_json
from vimoe_dist.config import load_config
from vimoe_dist.model.moe.registry import ALL_ROUTER_OPTIONS, ROUTER_NAMES, ROUTER_SPECS


def _moe(impl: str, router: str, k: int, args: argparse.Namespace, capacity_factor: float | None = -1.0):
    """One MoE FFN: ours (`build_moe`) or a reference layer, passed in as the layer factory it is."""
    factory = _layer_factory(impl)
    cf = args.capacity_factor if capacity_factor == -1.0 else capacity_factor
    torch.manual_seed(0)  # the same gate and expert weights in every variant: loads differ only by the algorithm
    overrides = [
        f"model.moe.router={router}", f"model.moe.top_k={k}", "model.moe.routing=token",
        f"model.moe.num_experts={args.experts}", f"model.moe.capacity_factor={'null' if cf is None else cf}",
        f"model.moe.group_size={args.group_size}", "model.moe.shared_expert=false",
        f"model.moe.switch_loss={0 if router == 'soft' else 0.01}", "model.moe.renormalize=true",
        "model.moe.slots_per_expert=1",  # soft: 1 slot per expert (not derived from the capacity factor)
    ]  # fmt: skip
    # the same settings for every variant, less the options this router does not take (config refuses those)
    ignored = {f"model.moe.{o}" for o in ALL_ROUTER_OPTIONS if o not in ROUTER_SPECS[router].options}
    overrides = [o for o in overrides if o.split("=")[0] not in ignored]
    return factory(args.dim, args.hidden, load_config(None, overrides).model.moe)


def _layer_factory(impl: str):
    """Ours, or a reference layer (`vimoe_dist.parallel.reference`, imported only when asked for: fairscale is an
    optional extra)."""
    if impl == "deepspeed":
        from vimoe_dist.parallel.reference.deepspeed_moe import DeepSpeedMoEFFN

        return DeepSpeedMoEFFN
    if impl == "fairscale":
        from vimoe_dist.parallel.reference.fairscale_moe import FairscaleMoEFFN

        return FairscaleMoEFFN
    from vimoe_dist.model import build_moe

    return build_moe


def _step(module, x: torch.Tensor):
    def run() -> None:
        y = module(x)
        loss = y.float().square().mean() + getattr(module, "aux_loss", 0)
        loss.backward()
        module.zero_grad(set_to_none=True)

    run.module = module
    return run


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    x = torch.randn(args.images, args.tokens, args.dim)
    variants, meta = {}, {}
    for k in sorted({1, args.top_k}):
        xk = x.repeat(k, 1, 1)
        variants[f"dense x{k}"] = _step(Mlp(args.dim, args.hidden), xk)
        meta[f"dense x{k}"] = {"impl": "timm Mlp", "router": "-", "k": k}
    for name in ROUTER_NAMES:
        k = 1 if name == "soft" else args.top_k
        variants[f"vimoe {name}"] = _step(_moe("vimoe", name, k, args), x)
        meta[f"vimoe {name}"] = {"impl": "vimoe", "router": name, "k": k}
    variants["vimoe tc-softmax k1"] = _step(_moe("vimoe", "tc-softmax", 1, args), x)
    meta["vimoe tc-softmax k1"] = {"impl": "vimoe", "router": "tc-softmax", "k": 1}
    # dropless: exactly k x T rows reach the experts, the same work as the k x dense baseline
    for k in sorted({1, args.top_k}):
        variants[f"vimoe tc-softmax dropless k{k}"] = _step(_moe("vimoe", "tc-softmax", k, args, None), x)
        meta[f"vimoe tc-softmax dropless k{k}"] = {"impl": "vimoe", "router": "tc-softmax dropless", "k": k}
    if hasattr(torch.nn.functional, "grouped_mm"):  # the bank's fused path, forced (auto picks it on CUDA bf16 only)
        grouped = _moe("vimoe", "tc-softmax", args.top_k, args)
        grouped.experts.grouped_mm = True
        variants["vimoe tc-softmax grouped_mm"] = _step(grouped, x)
        meta["vimoe tc-softmax grouped_mm"] = {"impl": "vimoe", "router": "tc-softmax", "k": args.top_k}
    for k in (1, 2):
        variants[f"deepspeed k{k}"] = _step(_moe("deepspeed", "tc-softmax", k, args), x)
        meta[f"deepspeed k{k}"] = {"impl": "deepspeed", "router": "TopKGate", "k": k}
    variants["fairscale k2"] = _step(_moe("fairscale", "tc-softmax", 2, args), x)
    meta["fairscale k2"] = {"impl": "fairscale", "router": "Top2Gate", "k": 2}
    if args.only:
        keep = set(args.only.split(","))
        variants = {n: f for n, f in variants.items() if n in keep or n.startswith("dense")}

    modules = {name: fn.module for name, fn in variants.items()}
    samples = interleaved_samples(variants, rounds=args.rounds)
    rows = []
    for name, t in samples.items():
        k = meta[name]["k"]
        stats = getattr(modules[name], "last_stats", None)
        dense = samples.get(f"dense x{k}")
        ds = samples.get(f"deepspeed k{k}")
        rows.append({
            "variant": name, **meta[name], "ms": 1000 * statistics.median(t),
            "expert_rows": int(stats["tokens"].sum()) if stats else k * x.shape[0] * x.shape[1],
            "max_load": round(float(stats["tokens"].max() / stats["tokens"].float().mean()), 2) if stats else None,
            "ratio_vs_dense": paired_ratio(dense, t) if dense and "dense" not in name else None,
            "speedup_vs_deepspeed": paired_ratio(ds, t) if ds and not name.startswith(("deepspeed", "dense")) else None,
        })  # fmt: skip
    print(f"\nMoE FFN forward+backward: dim {args.dim}, hidden {args.hidden}, {args.experts} experts, "
          f"{args.images}x{args.tokens} tokens, capacity factor {args.capacity_factor}, {torch.get_num_threads()} "
          f"threads, median of {args.rounds} interleaved rounds (ratios: median of the per-round ratios)")  # fmt: skip
    print_table(rows, ["variant", "k", "expert_rows", "max_load", "ms", "ratio_vs_dense", "speedup_vs_deepspeed"])
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings |= {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    payload = {"bench": "moe", "settings": settings, "rows": rows}
    write_json(args.out, payload)
    return payload
