"""One rank of the layout-invariance check (started by torchrun from test_layout_invariance.py).

Feeds the same global batches from memory (rank r takes its slice) through the trainer's own steps (build,
parallelize, `build_engine`) and records the global mean loss of every step and this rank's expert parameter count.
Usage: torchrun --nproc-per-node N tests/multiproc/layout_worker.py OUT.json EP_SIZE ROUTER [ROUTER ...]
"""

import json
import sys

import torch
import torch.distributed as dist

from vimoe_dist.config import load_config
from vimoe_dist.model import aux_loss, build_model, moe_layers
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.parallel.env import resolve_env
from vimoe_dist.parallel.init import init_distributed
from vimoe_dist.parallel.parallelize import parallelize
from vimoe_dist.train.setup import build_criterion, build_engine, seed_everything

ROUTERS = {
    # tc-softmax with a capacity that drops tokens, token routing
    "tc-softmax": ["model.moe.router=tc-softmax", "model.moe.routing=token", "model.moe.capacity_factor=1.0"],
    "ec-softmax": ["model.moe.router=ec-softmax", "model.moe.routing=image", "model.moe.capacity_factor=1.0"],
    "soft": ["model.moe.router=soft", "model.moe.routing=token", "model.moe.switch_loss=0"],
}
STEPS, GLOBAL_BATCH = 10, 16


def main() -> None:
    out, ep_size, routers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    results = {}
    for router in routers:
        cfg = load_config(
            None,
            [
                "model.backbone=vit_tiny_patch16_224",
                "model.img_size=16",
                "model.num_classes=10",
                "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
                "model.moe.layers=last-2",
                "model.moe.num_experts=4",
                "model.moe.top_k=2",
                "model.moe.group_size=2",
                f"parallel.ep_size={ep_size}",
                f"train.global_batch_size={GLOBAL_BATCH}",
                "train.lr=0.01",
                "train.warmup_steps=0",
                f"train.steps={STEPS}",
                "data.train=unused",
                *ROUTERS[router],
            ],
        )
        env = resolve_env()
        init_distributed(cfg, env)
        rank, world = env.rank, env.world_size
        seed_everything(cfg.run.seed)
        model = parallelize(build_model(cfg.model), cfg.parallel.ep_size)
        engine, _, scheduler = build_engine(model, cfg, world)
        criterion = build_criterion(cfg)
        layers = moe_layers(unwrap(engine))
        expert_params = sum(p.numel() for p in engine.module.parameters() if getattr(p, "allreduce", True) is False)
        gen = torch.Generator().manual_seed(1234)
        losses = []
        b = GLOBAL_BATCH // world
        for step in range(STEPS):
            images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
            labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen)
            mine = slice(rank * b, (rank + 1) * b)
            logits = engine(images[mine])
            loss = criterion(logits, labels[mine]) + aux_loss(layers)
            engine.backward(loss)
            engine.step()
            scheduler.step_update(step + 1)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        results[router] = {
            "losses": losses,
            "expert_params": expert_params,
            "local_experts": layers[min(layers)].experts.num_experts,
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    else:
        with open(f"{out}.rank{dist.get_rank()}", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
