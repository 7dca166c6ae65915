"""`vimoe bench train`: training throughput.

1. ViMoE against the dense ViT of the same backbone (one process, forward + backward + AdamW step).
2. ep_size 2 against ep_size 1 on 2 ranks (a torchrun job running both engines interleaved, round by round), with
   the model-state memory per rank (parameters, gradients and AdamW moments) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vimoe_dist.bench.cli import train_arguments
from vimoe_dist.bench.timing import interleaved, print_table, write_json
from vimoe_dist.config import load_config


def _train_step(model, images, labels):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> None:
        from vimoe_dist.model import aux_loss

        loss = torch.nn.functional.cross_entropy(model(images), labels) + aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def moe_vs_dense(args: argparse.Namespace) -> list[dict]:
    from vimoe_dist.model import build_model

    cfg = load_config(args.config, args.overrides)
    b = args.batch
    images = torch.randn(b, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    labels = torch.randint(0, cfg.model.num_classes, (b,))
    torch.manual_seed(0)
    moe = build_model(cfg.model).train()
    dense_cfg = load_config(args.config, [*args.overrides, "model.moe.layers=last-0"])
    dense = build_model(dense_cfg.model).train()
    times = interleaved({"dense": _train_step(dense, images, labels), "vimoe": _train_step(moe, images, labels)},
                        rounds=args.rounds)  # fmt: skip
    return [
        {"run": "dense ViT", "ranks": 1, "ep_size": "-", "images_per_sec": b / times["dense"], "ratio": 1.0},
        {"run": "ViMoE", "ranks": 1, "ep_size": "-", "images_per_sec": b / times["vimoe"],
         "ratio": times["dense"] / times["vimoe"]},
    ]  # fmt: skip


def ep_scaling(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ep.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "vimoe_dist.bench.train", "--worker", str(out), "--config", args.config,
               "--batch", str(args.batch), "--rounds", str(args.rounds), *args.overrides]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = json.loads(out.read_text())
    base = result["1"]["images_per_sec"]
    return [
        {"run": "ViMoE", "ranks": 2, "ep_size": ep, "images_per_sec": r["images_per_sec"],
         "ratio": r["images_per_sec"] / base, "state_mib_per_rank": r["state_mib"], "peak_rss_mib": r["peak_rss_mib"]}
        for ep, r in result.items()
    ]  # fmt: skip


def _worker(out: str, args: argparse.Namespace) -> None:
    from vimoe_dist.model import aux_loss, build_model, moe_layers
    from vimoe_dist.parallel.collectives import barrier, rank
    from vimoe_dist.parallel.engine import unwrap
    from vimoe_dist.parallel.env import resolve_env
    from vimoe_dist.parallel.init import init_distributed
    from vimoe_dist.parallel.parallelize import parallelize
    from vimoe_dist.train.setup import build_criterion, build_engine, seed_everything

    engines, per_rank = {}, args.batch // 2
    for ep in (1, 2):
        cfg = load_config(args.config, [*args.overrides, f"parallel.ep_size={ep}",
                                        f"train.global_batch_size={args.batch}", "data.train=unused"])  # fmt: skip
        env = resolve_env()
        init_distributed(cfg, env)
        seed_everything(cfg.run.seed)
        model = parallelize(build_model(cfg.model), cfg.parallel.ep_size)
        engine, _, _ = build_engine(model, cfg, env.world_size)
        engines[ep] = (engine, cfg)
    criterion = build_criterion(cfg)
    images = torch.randn(per_rank, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    labels = torch.randint(0, cfg.model.num_classes, (per_rank,))

    def step(engine):
        def run() -> None:
            loss = criterion(engine(images), labels) + aux_loss(moe_layers(unwrap(engine)))
            engine.backward(loss)
            engine.step()
            barrier()

        return run

    times = interleaved({ep: step(e) for ep, (e, _) in engines.items()}, rounds=args.rounds)
    result = {}
    for ep, (engine, _) in engines.items():
        params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        result[str(ep)] = {
            "images_per_sec": args.batch / times[ep],
            "state_mib": 4 * params / 2**20,  # weights + gradients + two AdamW moments, fp32
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    if rank() == 0:
        Path(out).write_text(json.dumps(result))


def run(args: argparse.Namespace) -> dict:
    rows = moe_vs_dense(args) + ([] if args.skip_ep else ep_scaling(args))
    print(f"\nTraining step throughput ({args.config} {' '.join(args.overrides)}, global batch {args.batch}, "
          f"median of {args.rounds} interleaved rounds)")  # fmt: skip
    print_table(rows, ["run", "ranks", "ep_size", "images_per_sec", "ratio", "state_mib_per_rank", "peak_rss_mib"])
    payload = {"bench": "train", "config": args.config, "overrides": args.overrides, "batch": args.batch, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":  # the torchrun worker of ep_scaling
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    train_arguments(parser)
    ns = parser.parse_args()
    _worker(ns.worker, ns)
