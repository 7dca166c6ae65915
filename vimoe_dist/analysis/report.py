"""The output of `vimoe analyze routing`: `routing.json`, `matrices.pt`, heatmaps and a printed summary.

OUT/routing.json        scores per MoE layer, model-level numbers, the recommendation, the classes each expert takes
                        (named where the data set or the run names them), definitions
OUT/matrices.pt         the accumulated statistics (RoutingAccumulator.state_dict()), to redraw or rescore
OUT/heatmaps/block_NN.png   per layer: image-level and token-level class x expert shares
OUT/overview.png        every MoE layer side by side
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vimoe_dist.analysis.accumulate import RoutingAccumulator
from vimoe_dist.analysis.heatmaps import plot_layer, plot_overview
from vimoe_dist.analysis.recommend import RecommendConfig, recommend
from vimoe_dist.analysis.scores import DEFINITIONS, layer_scores, row_shares

TOP_CLASSES = 5  # classes listed per expert in routing.json


def build_report(
    acc: RoutingAccumulator,
    top1: float,
    images: int,
    depth: int,
    rec_cfg: RecommendConfig | None = None,
    meta: dict | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """Everything `routing.json` holds."""
    scores = {block: layer_scores(layer) for block, layer in acc.layers.items()}
    rec = recommend(scores, rec_cfg)
    degrees = [s["routing_degree"] for s in scores.values()]
    return {
        **(meta or {}),
        "images": images,
        "top1": top1,
        "model": {
            "depth": depth,
            "moe_layers": sorted(scores),
            "routing_degree": sum(degrees) / len(degrees) if degrees else 0.0,
            "specialised_layers": rec["keep"],
        },
        "layers": {str(b): s for b, s in scores.items()},
        "recommendation": {**rec, "layers": {str(b): v for b, v in rec["layers"].items()}},
        "classes_named": class_names is not None,
        "expert_classes": {str(b): expert_classes(la.image_weight_CE, class_names) for b, la in acc.layers.items()},
        "definitions": {
            **DEFINITIONS,
            "model.routing_degree": "mean over MoE layers of the experts a token reaches",
            "counting": "top-k counted by weight in the image and token matrices, k times in the hits matrix",
            "expert_classes": f"per expert, the {TOP_CLASSES} classes with the largest share of their images on it",
        },
    }


def expert_classes(image_CE: torch.Tensor, class_names: list[str] | None, n: int = TOP_CLASSES) -> dict[str, list]:
    """Per expert, the `n` classes that send it the largest share of their images (names where known)."""
    shares = row_shares(image_CE)
    seen = image_CE.sum(1) > 0
    out = {}
    for e in range(shares.shape[1]):
        order = torch.argsort(torch.where(seen, shares[:, e], -1.0), descending=True, stable=True)
        top = [int(c) for c in order[:n] if seen[c] and shares[c, e] > 0]
        out[str(e)] = [class_names[c] if class_names and c < len(class_names) else c for c in top]
    return out


def write_report(
    out_dir: str | Path, report: dict, acc: RoutingAccumulator, class_names: list[str] | None = None
) -> list[Path]:
    """Writes routing.json, matrices.pt and the heatmaps; returns the written paths."""
    out = Path(out_dir)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    paths = [out / "routing.json", out / "matrices.pt"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    torch.save({"layers": acc.state_dict(), "class_names": class_names}, paths[1])
    decisions = {int(b): v["decision"] for b, v in report["recommendation"]["layers"].items()}
    scores = {int(b): s for b, s in report["layers"].items()}
    for block, layer in acc.layers.items():
        paths.append(
            plot_layer(
                out / "heatmaps" / f"block_{block:02d}.png",
                block,
                layer.image_weight_CE,
                layer.token_weight_CE,
                class_names,
                scores[block],
            )
        )
    if acc.layers:
        image = {block: layer.image_weight_CE for block, layer in acc.layers.items()}
        paths.append(plot_overview(out / "overview.png", image, scores, decisions))
    return paths


def summary_lines(report: dict) -> list[str]:
    """A table for the console: one line per MoE layer, then the recommendation."""
    lines = [
        f"{report['images']} images, top-1 {report['top1']:.4f}, "
        f"routing degree {report['model']['routing_degree']:.2f} experts per token",
        f"{'block':>5} {'spec.':>6} {'chance':>6} {'dep.':>6} {'NMI':>6} {'purity':>6} {'loadCV':>6} "
        f"{'drop':>6}  decision",
    ]
    rec = report["recommendation"]
    for block, s in report["layers"].items():
        lines.append(
            f"{block:>5} {s['specialisation']:6.3f} {s['specialisation_chance']:6.3f} {s['image_dependence']:6.3f} "
            f"{s['nmi']:6.3f} {s['purity']:6.3f} {s['load_cv']:6.3f} {s['dropped_tokens']:6.3f}  "
            f"{rec['layers'][block]['decision']}: {rec['layers'][block]['reason']}"
        )
    if report.get("expert_classes"):
        block = max(report["expert_classes"], key=int)
        experts = report["expert_classes"][block]
        named = " | ".join(f"{e}: {', '.join(map(str, c[:3]))}" for e, c in experts.items() if c)
        lines.append(f"block {block}, classes most routed to each expert: {named}")
    keep = ", ".join(map(str, rec["keep"])) or "none"
    lines.append(f"specialised (keep): {keep}; redundant: {', '.join(map(str, rec['redundant'])) or 'none'}")
    lines.append(f"next: vimoe prune --checkpoint {report.get('checkpoint', 'CKPT')} {rec['prune_args']} --out DIR")
    return lines
