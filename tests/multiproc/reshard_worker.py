"""One rank of the resharding check (started by torchrun from test_reshard.py).

For each case (ZeRO stage, precision) it builds the trainer's model and engine at this job's layout, optionally
resumes a checkpoint through the trainer's own `checkpoint.resume`, trains the same global batches as every other
layout (rank r takes its slice; batch s is a function of s alone), records the global mean loss of every step and,
where asked, saves a checkpoint through `checkpoint.save`.

Around a save and after a resume it also gathers the optimizer state with DeepSpeed's own API (the tensor-fragment
functions for ZeRO, the optimizers' state otherwise), independent of our reader: the state gathered after a resume
must equal, bit for bit, the state gathered when the checkpoint was saved.

Usage: torchrun --nproc-per-node N tests/multiproc/reshard_worker.py SPEC.json
SPEC: {"out": FILE, "ep": EP, "cases": [{"name", "zero", "precision", "steps", "resume": ROOT|null,
       "resume_step": S, "save_root": ROOT|null, "save_at": S|null}]}
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vimoe_dist.config import load_config
from vimoe_dist.model import aux_loss, build_model, moe_layers
from vimoe_dist.parallel.checkpoint_layout import EXPERT_PARAM_RE, tag_for
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.parallel.env import resolve_env
from vimoe_dist.parallel.groups import expert_parallel_rank
from vimoe_dist.parallel.init import init_distributed
from vimoe_dist.parallel.parallelize import parallelize
from vimoe_dist.train import checkpoint
from vimoe_dist.train.setup import build_criterion, build_engine, seed_everything

GLOBAL_BATCH = 8


def config(ep: int, zero: int, precision: str):
    return load_config(None, [
        "model.backbone=vit_tiny_patch16_224", "model.img_size=8", "model.num_classes=10",
        "model.backbone_kwargs={patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2}",
        "model.moe.layers=last-2", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.group_size=2",
        "model.moe.router=tc-softmax", "model.moe.routing=token", "model.moe.capacity_factor=1.0",
        f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}", f"parallel.precision={precision}",
        f"train.global_batch_size={GLOBAL_BATCH}", "train.lr=0.01", "train.warmup_steps=2", "train.steps=6",
        "data.train=unused",
    ])  # fmt: skip


def my_experts(engine) -> range:
    """The global ids of this rank's experts."""
    layer = next(iter(moe_layers(unwrap(engine)).values()))
    local = layer.experts.num_experts
    first = expert_parallel_rank(layer.num_experts // local) * local
    return range(first, first + local)


def gathered_state(engine) -> dict[str, torch.Tensor]:
    """This rank's optimizer state through DeepSpeed's API, keyed `name|key` (dense) or `name|key|expert` (one
    expert of a bank, by global id); collective under ZeRO."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
    from deepspeed.utils.tensor_fragment import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "bit16_groups"):
        # DeepSpeed 0.19.8 links the fragments' optimizer state once, right after the first group's first step, when
        # the other groups have none yet: safe_get_full_optimizer_state then fails for their parameters
        for lp, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp, flat, opt.optimizer.state)
    first = my_experts(engine).start
    masters = {}
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # FP16_UnfusedOptimizer
        masters = {lp: m for lg, mg in zip(opt.fp16_groups, opt.fp32_groups) for lp, m in zip(lg, mg)}
    out = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2
            state = {"fp32": safe_get_full_fp32_param(p)}
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = safe_get_full_optimizer_state(p, key)
            flats = zip(opt.single_partition_of_fp32_groups, opt.bit16_groups)
            flat = next(f for f, g in flats if any(q is p for q in g))
            state["step"] = opt.optimizer.state[flat]["step"]
        elif p in masters:
            state = {"fp32": masters[p], **opt.optimizer.state[masters[p]]}
        else:
            state = dict(opt.state[p])
        for key, value in state.items():
            value = value.detach().float().cpu().clone()
            if EXPERT_PARAM_RE.match(name) and value.dim() > 0:
                for i in range(value.shape[0]):
                    out[f"{name}|{key}|{first + i}"] = value[i]
            else:
                out[f"{name}|{key}"] = value
    return out


def run_case(case: dict, ep: int, env) -> dict:
    cfg = config(ep, case["zero"], case["precision"])
    init_distributed(cfg, env)
    rank, world = env.rank, env.world_size
    seed_everything(cfg.run.seed)
    model = parallelize(build_model(cfg.model), ep)
    engine, _, scheduler = build_engine(model, cfg, world)
    criterion = build_criterion(cfg)
    layers = moe_layers(unwrap(engine))
    dtype = torch.bfloat16 if case["precision"] == "bf16" else torch.float32
    result = {"losses": {}, "compared": 0, "differ": []}
    start = 0
    if case.get("resume"):
        root = Path(case["resume"])
        start, _ = checkpoint.resume(engine, cfg, (root, tag_for(case["resume_step"])), env)
        mine = gathered_state(engine)
        ref = {}
        for f in sorted(root.glob(f"ref_{start}_rank*.pt")):
            ref.update(torch.load(f))
        experts = {str(e) for e in my_experts(engine)}
        for key in ref:  # every state saved for this rank's parameters (its experts' share of each bank)
            if key.count("|") == 1 or key.rsplit("|", 1)[1] in experts:
                result["compared"] += 1
                if key not in mine or not torch.equal(ref[key], mine[key]):
                    result["differ"].append(key)
    b = GLOBAL_BATCH // world
    for step in range(start + 1, case["steps"] + 1):
        gen = torch.Generator().manual_seed(1000 + step)
        images = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen)
        labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen)
        mine = slice(rank * b, (rank + 1) * b)
        loss = criterion(engine(images[mine].to(dtype)).float(), labels[mine]) + aux_loss(layers)
        engine.backward(loss)
        engine.step()
        scheduler.step_update(step)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        result["losses"][step] = mean.item() / world
        if step == case.get("save_at"):
            root = Path(case["save_root"])
            client = {"step": step, "ep_size": ep, "world_size": world}
            checkpoint.save(engine, root, step, client, {"step": step}, keep=10)
            torch.save(gathered_state(engine), root / f"ref_{step}_rank{rank}.pt")
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    env = resolve_env()
    results = {case["name"]: run_case(case, spec["ep"], env) for case in spec["cases"]}
    out = spec["out"] if env.rank == 0 else f"{spec['out']}.rank{env.rank}"
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
