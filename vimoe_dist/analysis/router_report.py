"""The report of `vimoe study routers`: per router, mean and spread over seeds of top-1, top-5, final train loss,
images/s, dropped share and load balance; a plot; and one sentence per finding of "Routers in Vision Mixture of
Experts" (Liu et al., TMLR 2024) on whether its ranking held on this data:
  (i)   routers first made for language work in vision: every router learns the task;
  (ii)  in sparse MoE, Expert Choice routers generally beat Token Choice routers;
  (iii) Soft MoE beats the sparse MoEs at a fixed compute budget.

Comparisons are paired by seed (runs of one seed share initialisation and data order). A ranking "held" when its
gap is above the seed noise (twice the standard error of the per-seed gaps), "reversed" when the opposite gap is,
and is "not shown" otherwise (or with a single seed).

Read from each run directory OUT/ROUTER/seedS: `eval.json` (top-1, top-5), `config.yaml`, `deepspeed_config.json`
(the batch per rank) and `metrics.jsonl` (loss, images/s and the MoE statistics of rank 0 at every log step:
`dropped` rows that reached no expert and `tokens` rows per expert, per MoE block).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from vimoe_dist.errors import UserError

TOKEN_CHOICE = ("tc-softmax", "tc-sinkhorn")
EXPERT_CHOICE = ("ec-softmax", "ec-sinkhorn", "ec-sparse")
METRICS = ("top1", "top5", "train_loss", "images_per_sec", "dropped", "load")
HEADERS = ("top-1 (%)", "top-5 (%)", "final train loss", "images/s", "dropped share (%)", "load max/mean")


@dataclass
class Report:
    lines: list[str]
    table: Path
    plot: Path
    json: Path


def run_metrics(run: Path, tokens_per_image: dict[str, int]) -> dict:
    """One finished run's numbers (see the module docstring)."""
    ev = json.loads((run / "eval.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ds = json.loads((run / "deepspeed_config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logs = [r for r in records if "loss" in r and "images_per_sec" in r]
    if not logs:
        raise ValueError("metrics.jsonl holds no training log")
    moe = cfg["model"]["moe"]
    rows_per_image = _tokens_per_image(cfg, tokens_per_image)
    images_per_step = ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1)
    dropped = rows = 0.0
    tokens: dict[str, list[float]] = {}
    prev = 0
    for r in logs:
        for block, s in r.get("moe", {}).items():
            dropped += s["dropped"]
            rows += (r["step"] - prev) * images_per_step * rows_per_image
            acc = tokens.setdefault(block, [0.0] * len(s["tokens"]))
            tokens[block] = [a + t for a, t in zip(acc, s["tokens"])]
        prev = r["step"]
    loads = [max(t) / (sum(t) / len(t)) for t in tokens.values() if sum(t) > 0]
    speeds = [r["images_per_sec"] for r in logs[1:]] or [logs[0]["images_per_sec"]]  # the first holds warm-up
    return {
        "router": moe["router"],
        "seed": cfg["run"]["seed"],
        "run": str(run),
        "top1": 100 * float(ev["top1"]),
        "top5": 100 * float(ev["top5"]),
        "train_loss": float(logs[-1]["loss"]),
        "images_per_sec": statistics.fmean(speeds),
        "dropped": 100 * dropped / rows if rows else 0.0,
        "load": statistics.fmean(loads) if loads else float("nan"),
        "loss_curve": [(r["step"], r["loss"]) for r in logs],
    }


def _tokens_per_image(cfg: dict, cache: dict[str, int]) -> int:
    """Rows an image brings to an MoE block: its tokens (the backbone's patches plus prefix tokens)."""
    key = json.dumps(cfg["model"], sort_keys=True)
    if key not in cache:
        from vimoe_dist.config import ModelConfig, from_dict
        from vimoe_dist.model import build_dense

        vit = build_dense(from_dict(ModelConfig, cfg["model"], "model."))
        cache[key] = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1)
    return cache[key]


def collect(study_dir: Path) -> list[dict]:
    """Every finished run under `study_dir` (OUT/ROUTER/seedS/eval.json); unreadable ones are skipped, with a line."""
    results, cache = [], {}
    for eval_path in sorted(study_dir.glob("*/seed*/eval.json")):
        try:
            results.append(
                {**run_metrics(eval_path.parent, cache), "run": str(eval_path.parent.relative_to(study_dir))}
            )
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
            print(f"study: skipping {eval_path.parent}: {e}", file=sys.stderr)
    return results


def summarise(results: list[dict]) -> dict[str, dict]:
    """router -> {metric: (mean, spread over seeds or None), "n": seeds}, routers in the paper's order."""
    order = [*TOKEN_CHOICE, *EXPERT_CHOICE, "soft"]
    out: dict[str, dict] = {}
    for router in sorted({r["router"] for r in results}, key=lambda r: (order.index(r) if r in order else 99, r)):
        rs = [r for r in results if r["router"] == router]
        row: dict = {"n": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for m in METRICS:
            values = [r[m] for r in rs]
            row[m] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        out[router] = row
    return out


def _cell(mean: float, spread: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def table_lines(summary: dict[str, dict]) -> list[str]:
    """A markdown table: mean ± spread (sample standard deviation) over seeds."""
    digits = (1, 1, 3, 0, 1, 2)
    lines = ["| router | seeds | " + " | ".join(HEADERS) + " |", "|---|---|" + "---|" * len(HEADERS)]
    for router, row in summary.items():
        cells = [_cell(*row[m], d) for m, d in zip(METRICS, digits)]
        lines.append(f"| `{router}` | {row['n']} | " + " | ".join(cells) + " |")
    return lines


def _paired_gap(results: list[dict], a: list[str], b: list[str]) -> tuple[float, float | None, int]:
    """Mean top-1 of routers `a` minus that of routers `b`, paired by seed: (gap, 2 standard errors or None, seeds).

    Runs with the same seed share the backbone's initialisation and the data order (the trainer seeds both from
    run.seed), so seed-to-seed variation is largely common to every router: the comparison is made per seed, d_s =
    mean_a(s) - mean_b(s) over the seeds every router of both sides finished; the gap is mean(d), its noise
    2 stdev(d) / sqrt(n).
    """
    top1 = {(r["router"], r["seed"]): r["top1"] for r in results}
    seeds = sorted(set.intersection(*({s for (r, s) in top1 if r == name} for name in (*a, *b))))
    if not seeds:
        return math.nan, None, 0
    d = [statistics.fmean(top1[r, s] for r in a) - statistics.fmean(top1[r, s] for r in b) for s in seeds]
    two_se = 2 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return statistics.fmean(d), two_se, len(d)


def _verdict(gap: float, two_se: float | None, seeds: int) -> tuple[str, str]:
    """('held' | 'reversed' | 'not shown', why): a ranking holds only when its gap is above the seed noise."""
    if seeds == 0:
        return "not shown", "no seed finished for every router compared"
    if two_se is None:
        return "not shown", f"gap {gap:+.1f} points; one common seed, no spread to judge it by"
    why = f"gap {gap:+.1f} points, 2 standard errors of the per-seed gap over {seeds} seeds {two_se:.1f}"
    if abs(gap) <= two_se:
        return "not shown", why + ": within the seed noise"
    return ("held" if gap > 0 else "reversed"), why


def findings(summary: dict[str, dict], results: list[dict]) -> list[str]:
    """One sentence per finding of the paper (module docstring), from top-1 over seeds."""
    out = []
    top1 = {r: row["top1"][0] for r, row in summary.items()}
    if top1:
        best, worst = max(top1, key=top1.get), min(top1, key=top1.get)
        out.append(f"(i) every router trains: top-1 from {top1[worst]:.1f}% ({worst}) to {top1[best]:.1f}% ({best}).")
    tc = [r for r in TOKEN_CHOICE if r in summary]
    ec = [r for r in EXPERT_CHOICE if r in summary]
    if tc and ec:
        verdict, why = _verdict(*_paired_gap(results, ec, tc))
        pairs = sum(top1[e] > top1[t] for e in ec for t in tc)
        out.append(f"(ii) Expert Choice over Token Choice {verdict}: expert choice averages "
                   f"{statistics.fmean(top1[r] for r in ec):.1f}% top-1, token choice "
                   f"{statistics.fmean(top1[r] for r in tc):.1f}% ({why}); {pairs} of {len(ec) * len(tc)} "
                   "expert/token pairs favour expert choice.")  # fmt: skip
    else:
        out.append("(ii) Expert Choice over Token Choice: not tested (needs a router of each kind).")
    sparse = [r for r in summary if r != "soft"]
    if "soft" in summary and sparse:
        rival = max(sparse, key=top1.get)
        verdict, why = _verdict(*_paired_gap(results, ["soft"], [rival]))
        beaten = sum(top1["soft"] > top1[r] for r in sparse)
        out.append(f"(iii) Soft MoE over sparse MoE at matched compute {verdict}: soft {top1['soft']:.1f}% top-1 "
                   f"against the best sparse router, {rival}, {top1[rival]:.1f}% ({why}); soft beats {beaten} of "
                   f"{len(sparse)} sparse routers.")  # fmt: skip
    else:
        out.append("(iii) Soft MoE over sparse MoE: not tested (needs soft and a sparse router).")
    return out


def plot(summary: dict[str, dict], results: list[dict], path: Path) -> Path:
    """Left: top-1 per router, mean ± spread over seeds with every seed as a dot. Right: training loss curves,
    mean over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    colours = {r: f"C{i}" for i, r in enumerate(summary)}
    for i, (router, row) in enumerate(summary.items()):
        mean, spread = row["top1"]
        ax.bar(i, mean, yerr=spread or 0, color=colours[router], alpha=0.6, capsize=4)
        seeds = [r["top1"] for r in results if r["router"] == router]
        ax.plot([i] * len(seeds), seeds, "k.", ms=5)
        curves = [r["loss_curve"] for r in results if r["router"] == router]
        steps = [s for s, _ in curves[0]]
        common = [k for k in range(len(steps)) if all(len(c) > k for c in curves)]
        ax2.plot([steps[k] for k in common], [statistics.fmean(c[k][1] for c in curves) for k in common],
                 color=colours[router], label=router)  # fmt: skip
    lows = [r["top1"] for r in results]
    ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(lows) + 3))
    ax.set_xticks(range(len(summary)), list(summary), rotation=30, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("top-1 at matched compute (bars: mean ± sd; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("train loss (mean over seeds)")
    ax2.set_title("training loss")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.savefig(path, dpi=120)
    return path


def write_report(study_dir: Path) -> Report:
    """Writes STUDY/routers.md (table and findings), STUDY/routers.json and STUDY/routers.png."""
    results = collect(study_dir)
    if not results:
        raise UserError(f"{study_dir}: no finished run (no ROUTER/seedS/eval.json)")
    summary = summarise(results)
    lines = [*table_lines(summary), "", *findings(summary, results)]
    table = study_dir / "routers.md"
    table.write_text("\n".join(lines) + "\n")
    data = {"summary": summary, "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in results]}
    (study_dir / "routers.json").write_text(json.dumps(data, indent=2) + "\n")
    return Report(lines, table, plot(summary, results, study_dir / "routers.png"), study_dir / "routers.json")
