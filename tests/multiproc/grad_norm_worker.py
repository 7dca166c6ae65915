"""One rank of the gradient-norm check (started by torchrun from test_metrics_grad_norm.py).

For each `precision:zero_stage` given, builds the trainer's engine (build, parallelize, `build_engine`) around the
same tiny ViMoE, takes one optimizer step of two micro-batches on the same global batch (rank r takes its slice)
with a gradient clip far below the norm, and records `GradNorm.take()` (ours where DeepSpeed keeps none) and
whether it was ours.
Usage: torchrun --nproc-per-node N tests/multiproc/grad_norm_worker.py OUT.json EP_SIZE PRECISION:ZERO [...]
"""

import json
import sys

import torch

from vimoe_dist.config import load_config
from vimoe_dist.model import aux_loss, build_model, moe_layers
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.parallel.env import resolve_env
from vimoe_dist.parallel.init import init_distributed
from vimoe_dist.parallel.parallelize import parallelize
from vimoe_dist.train.grad_norm import GradNorm
from vimoe_dist.train.setup import build_criterion, build_engine, seed_everything

GLOBAL_BATCH, ACCUM, CLIP = 16, 2, 1e-3


def main() -> None:
    out, ep_size, combos = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    results = {}
    for combo in combos:
        precision, zero = combo.split(":")
        cfg = load_config(
            None,
            [
                "model.backbone=vit_tiny_patch16_224", "model.img_size=16", "model.num_classes=10",
                "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
                "model.moe.layers=last-2", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.group_size=2",
                "model.moe.routing=token", "model.moe.shared_expert=false",  # every expert gets rows and weight
                f"parallel.ep_size={ep_size}", f"parallel.precision={precision}", f"parallel.zero_stage={zero}",
                f"train.global_batch_size={GLOBAL_BATCH}", f"train.grad_accum={ACCUM}", f"train.grad_clip={CLIP}",
                "train.warmup_steps=0", "data.train=unused",
            ],
        )  # fmt: skip
        env = resolve_env()
        init_distributed(cfg, env)
        seed_everything(cfg.run.seed)
        model = parallelize(build_model(cfg.model), cfg.parallel.ep_size)
        engine, _, _ = build_engine(model, cfg, env.world_size)
        norm = GradNorm(engine, unwrap(engine), env.world_size, ep_size)
        criterion, layers = build_criterion(cfg), moe_layers(unwrap(engine))
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        gen = torch.Generator().manual_seed(1234)
        images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
        labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen)
        micro = GLOBAL_BATCH // env.world_size // ACCUM
        for m in range(ACCUM):
            start = (env.rank * ACCUM + m) * micro
            loss = criterion(engine(images[start : start + micro].to(dtype)).float(), labels[start : start + micro])
            engine.backward(loss + aux_loss(layers))
            if m == ACCUM - 1:
                norm.capture()  # where train_step captures it: reduced, not yet clipped
            engine.step()
        results[combo] = {"norm": norm.take(), "own": norm.own}
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
