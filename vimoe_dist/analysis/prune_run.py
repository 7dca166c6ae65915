"""`vimoe prune`: evaluate, replace the MoE layers not kept by dense FFNs, evaluate again, write what the trainer
fine-tunes from.

    OUT/model.safetensors   state dict of the pruned single-device model
    OUT/config.yaml         the run's config with model.moe.layers = the kept blocks, model.pretrained = the file
                            above and run.out_dir = OUT/finetune (so `vimoe train` does not resume the old run)
    OUT/prune.json          kept and pruned blocks, mode, top-1 before and after, parameter counts, expert loads
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from torch import nn

from vimoe_dist.config import Config, to_dict
from vimoe_dist.errors import UserError
from vimoe_dist.train.rundir import write_run_file


def prune_checkpoint(
    cfg: Config,
    model: nn.Module,
    keep_text: str,
    mode: str | None,
    out_dir: str | Path,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    source: str | Path | None = None,
) -> dict:
    """Runs the whole command on an already loaded model; returns the report (written by rank 0). `mode` None:
    `shared` when the model has a shared expert, else `average`."""
    from vimoe_dist.analysis.collect import run_routing
    from vimoe_dist.analysis.prune import parse_keep_layers, prune_model, save_pruned
    from vimoe_dist.data import build_val_loader
    from vimoe_dist.model import moe_layers

    blocks = list(moe_layers(model))
    keep = parse_keep_layers(keep_text, blocks)
    if mode is None:
        mode = (
            "shared" if any(getattr(m, "shared", None) is not None for m in moe_layers(model).values()) else "average"
        )
    params_before = sum(p.numel() for p in model.parameters())
    before = run_routing(model, build_val_loader(cfg, rank, world), cfg.model.num_classes, device, "prune: before")
    gates = {
        block: layer.mass_E / max(float(layer.tokens_C.sum()), 1.0) for block, layer in before.routing.layers.items()
    }
    pruned = prune_model(model, keep, mode, gates)
    after = run_routing(model, build_val_loader(cfg, rank, world), cfg.model.num_classes, device, "prune: after")
    out = Path(out_dir).resolve()
    report = {
        "source": str(Path(source).resolve()) if source is not None else None,
        "mode": mode,
        "keep": keep,
        "pruned": pruned,
        "top1_before": before.top1,
        "top1_after": after.top1,
        "images": before.images,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "dense_ffn_hidden": {str(b): model.blocks[b].mlp.fc1.out_features for b in pruned},
        "expert_gate_per_token": {str(b): [round(float(g), 6) for g in gates[b]] for b in pruned},
        "weights": str(out / "model.safetensors"),
        "config": str(out / "config.yaml"),
    }
    if rank == 0:
        from safetensors import SafetensorError

        check_out_dir(out)  # again: a training run may have started there meanwhile
        try:
            save_pruned(model, out)
        except (OSError, SafetensorError) as e:
            reason = getattr(e, "strerror", None) or e
            raise UserError(f"--out {out}: cannot write model.safetensors ({reason})") from None
        new_cfg = copy.deepcopy(cfg)
        new_cfg.model.moe.layers = list(keep)
        new_cfg.model.dense_ffn_hidden = {b: model.blocks[b].mlp.fc1.out_features for b in pruned}
        new_cfg.model.pretrained = report["weights"]
        new_cfg.run.out_dir = str(out / "finetune")
        write_run_file(out / "config.yaml", yaml.safe_dump(to_dict(new_cfg), sort_keys=False))
        write_run_file(out / "prune.json", json.dumps(report, indent=2) + "\n")
    return report


def check_out_dir(out_dir: str | Path) -> None:
    """`--out` must not be a training run's directory: its `config.yaml` is what eval and analysis of that run read,
    and prune would overwrite it. An earlier prune output (it holds `prune.json`) may be written again.

    Raises:
        UserError: `out_dir` holds `checkpoints/` or `metrics.jsonl`, or a `config.yaml` without `prune.json`, or is
            not a directory.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    run_files = [name for name in ("checkpoints", "metrics.jsonl") if (out / name).exists()]
    if (out / "config.yaml").exists() and not (out / "prune.json").exists():
        run_files.insert(0, "config.yaml")
    if run_files:
        raise UserError(
            f"--out {out_dir}: is a training run's directory (it holds {' and '.join(run_files)}), which prune must "
            f"not overwrite; choose another directory, e.g. {out / 'pruned'}"
        )
