"""Which MoE layers specialise (keep them) and which are redundant (turn them back into dense FFNs).

ViMoE (Han et al. 2024, Sec. 4) keeps the MoE layers whose routing heatmaps show images of a class going
consistently to the same experts, and removes the others without losing accuracy. The rule here makes that reading
explicit, over the scores of `scores.py`. A layer is kept when all three hold:

1. its routing depends on the image (`image_dependence` >= `min_dependence`): otherwise every image gets the same
   experts (a collapsed router) or tokens scatter evenly, and the layer acts as one averaged FFN;
2. the class explains a large share of that routing (`specialisation` >= `min_specialisation`);
3. that share is clearly above what shuffled labels give (`specialisation` >= `specialisation_chance` +
   `chance_margin`): with few images per class, chance alone produces apparent specialisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RecommendConfig:
    min_specialisation: float = 0.3
    min_dependence: float = 0.05
    chance_margin: float = 0.1


def recommend(scores: dict[int, dict], cfg: RecommendConfig | None = None) -> dict:
    """Keep/redundant decision per layer (block index -> scores), with the scores that decided it and why."""
    cfg = cfg or RecommendConfig()
    layers = {}
    for block, s in sorted(scores.items()):
        spec, chance, dep = s["specialisation"], s["specialisation_chance"], s["image_dependence"]
        if dep < cfg.min_dependence:
            keep = False
            reason = (
                f"routing hardly depends on the image (image_dependence {dep:.3f} < {cfg.min_dependence}): "
                "all images get the same mix of experts"
            )
        elif spec < cfg.min_specialisation:
            keep = False
            reason = f"the class explains {spec:.0%} of the routing (< {cfg.min_specialisation:.0%})"
        elif spec < chance + cfg.chance_margin:
            keep = False
            reason = (
                f"the class explains {spec:.0%} of the routing, but shuffled labels already explain {chance:.0%}: "
                "too few images per class to tell"
            )
        else:
            keep = True
            reason = (
                f"the class explains {spec:.0%} of the routing (>= {cfg.min_specialisation:.0%}; shuffled labels: "
                f"{chance:.0%})"
            )
        layers[block] = {
            "decision": "keep" if keep else "redundant",
            "reason": reason,
            "scores": {
                "specialisation": spec,
                "specialisation_chance": chance,
                "image_dependence": dep,
                "nmi": s["nmi"],
                "purity": s["purity"],
            },
        }
    keep = [b for b, v in layers.items() if v["decision"] == "keep"]
    return {
        "keep": keep,
        "redundant": [b for b in layers if b not in keep],
        "rule": (
            "keep a layer when image_dependence >= min_dependence, specialisation >= min_specialisation and "
            "specialisation >= specialisation_chance + chance_margin"
        ),
        "thresholds": asdict(cfg),
        "layers": layers,
        "prune_args": f"--keep-layers {','.join(map(str, keep)) if keep else 'none'}",
    }
