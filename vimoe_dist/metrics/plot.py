"""`vimoe plot RUN_DIR`: PNG curves of a run, drawn from its `metrics.jsonl`.

Three pictures, each a grid of panels:
- `training.png`: loss (train line, eval points), top-1 accuracy, images/s, learning rate - against the step;
- `expert_load.png`: one panel per MoE layer, the share of token assignments each expert received in each log
  interval as a stacked area, with the uniform share 1/E dashed - a collapsing router shows as one band swallowing
  the others (the picture of expert load used in V-MoE, Riquelme et al. 2021, fig. 7);
- `routing.png`: load imbalance (max/mean tokens per expert), router entropy and the share of dropped
  assignments, one line per layer;
- `efficiency.png` (when the records have them): achieved TFLOP/s per device, MFU, rank 0's GPU memory and the
  gradient norm.

Matplotlib's object API is used (no pyplot), so nothing touches a display or global state.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vimoe_dist.errors import UserError
from vimoe_dist.metrics.jsonl import FILENAME, read_jsonl

DPI = 110
EFFICIENCY_KEYS = ("achieved_tflops", "mfu", "gpu_peak_allocated_bytes", "grad_norm")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[Path, list[str]]:
    """Draws the curves of the run in `run_dir`.

    Args:
        run_dir: a run directory holding `metrics.jsonl`.
        out_dir: where the PNGs go (default `run_dir/plots`).

    Returns:
        Each PNG written, with the titles of its panels in order.
    """
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise UserError(f"plot: {str(path)!r} does not exist (is {str(run_dir)!r} a run directory?)")
    train, evals = _by_step(read_jsonl(path))
    if not train and not evals:
        raise UserError(f"plot: {str(path)!r} holds no training or eval records yet")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = {out / "training.png": _training(train, evals, out / "training.png")}
    layers = sorted({layer for r in train for layer in (r.get("moe") or {})}, key=_layer_key)
    if layers:
        written[out / "expert_load.png"] = _expert_load(train, layers, out / "expert_load.png")
        written[out / "routing.png"] = _routing(train, layers, out / "routing.png")
    if any(_series(train, key)[0] for key in EFFICIENCY_KEYS):
        written[out / "efficiency.png"] = _efficiency(train, out / "efficiency.png")
    return written


def _by_step(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """Train and eval records sorted by step; a repeated step keeps its last record."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int) or "event" in r:
            continue
        if r.get("eval_top1") is not None or r.get("eval_loss") is not None:
            evals[step] = r
        elif "loss" in r:
            train[step] = r
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _figure(rows: int, cols: int, width: float = 11.0, row_height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, row_height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _training(train: list[dict], evals: list[dict], path: Path) -> list[str]:
    fig, (loss, top1, speed, lr) = _figure(2, 2)
    loss.set_title("loss")
    steps, values = _series(train, "loss")
    loss.plot(steps, values, lw=1.2, label="train")
    steps, values = _series(evals, "eval_loss")
    if steps:
        loss.plot(steps, values, "o-", ms=4, label="eval")
    loss.legend(loc="upper right")

    top1.set_title("top-1 accuracy (eval, %)")
    steps, values = _series(evals, "eval_top1")
    if steps:
        scale = 100.0 if max(values) <= 1.0 else 1.0  # ratios are drawn as percent
        top1.plot(steps, [v * scale for v in values], "o-", ms=4, color="tab:green")
        top1.set_ylim(bottom=0)
    else:
        _empty(top1, "no evaluation yet")

    speed.set_title("throughput (images/s)")
    steps, values = _series(train, "images_per_sec")
    speed.plot(steps, values, lw=1.2, color="tab:purple")
    if values:
        speed.set_ylim(0, max(values) * 1.1 or 1.0)

    lr.set_title("learning rate")
    steps, values = _series(train, "lr")
    lr.plot(steps, values, lw=1.2, color="tab:orange")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss, top1, speed, lr):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("training")
    fig.savefig(path, dpi=DPI)
    return [ax.get_title() for ax in (loss, top1, speed, lr)]


def _expert_load(train: list[dict], layers: list[str], path: Path) -> list[str]:
    cols = min(2, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = _figure(rows, cols, row_height=3.2)
    titles = []
    for ax, layer in zip(axes, layers):
        steps, shares = [], []
        for r in train:
            tokens = ((r.get("moe") or {}).get(layer) or {}).get("tokens")
            if tokens and sum(tokens) > 0:
                steps.append(r["step"])
                shares.append([t / sum(tokens) for t in tokens])
        ax.set_title(f"expert load, block {layer}")
        titles.append(ax.get_title())
        if not steps:
            _empty(ax, "no tokens logged")
            continue
        num_experts = max(len(s) for s in shares)
        columns = [[s[e] if e < len(s) else 0.0 for s in shares] for e in range(num_experts)]
        ax.stackplot(steps, columns, labels=[f"expert {e}" for e in range(num_experts)], alpha=0.9)
        for k in range(1, num_experts):
            ax.axhline(k / num_experts, color="white", lw=0.6, ls="--", alpha=0.8)  # where equal shares would sit
        ax.set_ylim(0, 1)
        ax.set_xlim(steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of assignments")
        if num_experts <= 16:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small", frameon=False)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    fig.suptitle("expert load per MoE layer (dashed: uniform load)")
    fig.savefig(path, dpi=DPI)
    return titles


def _routing(train: list[dict], layers: list[str], path: Path) -> list[str]:
    fig, (imbalance, entropy, dropped) = _figure(1, 3, width=14.0)
    imbalance.set_title("load imbalance (max / mean)")
    entropy.set_title("router entropy (nats)")
    dropped.set_title("dropped assignments (%)")
    for layer in layers:
        stats = [(r["step"], (r.get("moe") or {}).get(layer) or {}) for r in train]
        for ax, key in ((imbalance, "imbalance"), (entropy, "entropy")):
            pairs = [(s, d[key]) for s, d in stats if isinstance(d.get(key), (int, float))]
            if pairs:
                ax.plot(*zip(*pairs), lw=1.2, label=f"block {layer}")
        pairs = [
            (s, 100.0 * d["dropped"] / (sum(d["tokens"]) + d["dropped"]))
            for s, d in stats
            if isinstance(d.get("dropped"), (int, float)) and d.get("tokens") and sum(d["tokens"]) + d["dropped"] > 0
        ]
        if pairs:
            dropped.plot(*zip(*pairs), lw=1.2, label=f"block {layer}")
    imbalance.axhline(1.0, color="gray", ls="--", lw=0.8)
    for ax in (imbalance, entropy, dropped):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines and any(line.get_label().startswith("block") for line in ax.lines):
            ax.legend(fontsize="x-small")
        else:
            _empty(ax, "not logged")
    fig.suptitle("routing statistics per MoE layer")
    fig.savefig(path, dpi=DPI)
    return [ax.get_title() for ax in (imbalance, entropy, dropped)]


def _efficiency(train: list[dict], path: Path) -> list[str]:
    fig, axes = _figure(2, 2)
    panels = (
        ("achieved TFLOP/s per device", [("achieved_tflops", "", 1.0)]),
        ("MFU (%)", [("mfu", "", 100.0)]),
        ("GPU memory, rank 0 (GiB)", [("gpu_peak_allocated_bytes", "peak allocated", 2**-30),
                                      ("gpu_reserved_bytes", "reserved", 2**-30),
                                      ("gpu_allocated_bytes", "allocated", 2**-30)]),
        ("gradient norm (before clipping)", [("grad_norm", "", 1.0)]),
    )  # fmt: skip
    for ax, (title, lines) in zip(axes, panels):
        ax.set_title(title)
        for key, label, scale in lines:
            steps, values = _series(train, key)
            if steps:
                ax.plot(steps, [v * scale for v in values], lw=1.2, label=label or None)
        if not ax.lines:
            _empty(ax, "not logged")
        elif len(ax.lines) > 1:
            ax.legend(fontsize="x-small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("efficiency")
    fig.savefig(path, dpi=DPI)
    return [ax.get_title() for ax in axes]


def _layer_key(layer: str) -> tuple[int, str]:
    return (int(layer), "") if layer.lstrip("-").isdigit() else (1 << 30, layer)
