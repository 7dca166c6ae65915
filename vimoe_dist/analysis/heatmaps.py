"""Routing heatmaps: class x expert shares of one MoE layer, and all layers side by side.

Classes are reordered the way ViMoE (Han et al. 2024, Fig. 5) shows them: grouped by their most-used expert and,
within a group, by how much of the class goes there, so a specialised layer shows a block diagonal and a redundant
one flat stripes. With many classes (ImageNet's 1000) consecutive classes in that order are averaged into at most
`max_rows` rows; the order keeps each bin within one expert group as far as the counts allow.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from vimoe_dist.analysis.scores import row_shares

MAX_ROWS = 64  # rows of a heatmap before classes are binned
MAX_LABELLED_ROWS = 32  # rows that still get a class name each


def order_classes(shares_CE: torch.Tensor) -> torch.Tensor:
    """Class order: by most-used expert, then by the share on it (descending); classes never seen go last."""
    shares = shares_CE.to(torch.float64)
    seen = shares.sum(1) > 0
    top_share, top_expert = shares.max(1)
    # sort keys, most significant first: unseen last, expert group, share on the group's expert (descending)
    key = (~seen).to(torch.float64) * 1e6 + top_expert.to(torch.float64) * 10 + (1 - top_share)
    return torch.argsort(key, stable=True)


def bin_rows(matrix_RE: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Averages consecutive rows into at most `max_rows` bins; returns them and each bin's [start, end) rows."""
    rows = matrix_RE.shape[0]
    if rows <= max_rows:
        return matrix_RE, [(r, r + 1) for r in range(rows)]
    per_bin = math.ceil(rows / max_rows)
    edges = [(s, min(rows, s + per_bin)) for s in range(0, rows, per_bin)]
    return torch.stack([matrix_RE[s:e].mean(0) for s, e in edges]), edges


def _prepare(matrix_CE: torch.Tensor, order: torch.Tensor, names: Sequence[str], max_rows: int):
    shares = row_shares(matrix_CE)[order]
    binned, edges = bin_rows(shares, max_rows)
    if len(edges) == shares.shape[0]:
        labels = [names[int(order[s])] for s, _ in edges]
        ylabel = "class (grouped by most-used expert)"
    else:
        labels = [f"{s}-{e - 1}" for s, e in edges]
        ylabel = f"classes in that order, {edges[0][1] - edges[0][0]} per row"
    return binned.numpy(), labels, ylabel


def _draw(ax, data, labels: list[str], ylabel: str, title: str, vmax: float):
    rows, experts = data.shape
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    step = max(1, math.ceil(experts / 16))
    ax.set_xticks(range(0, experts, step))
    if rows <= MAX_LABELLED_ROWS:
        ax.set_yticks(range(rows))
        ax.set_yticklabels(labels, fontsize=7)
    else:
        ticks = list(range(0, rows, math.ceil(rows / 16)))
        ax.set_yticks(ticks)
        ax.set_yticklabels([labels[t] for t in ticks], fontsize=7)
    return im


def plot_layer(
    path: str | Path,
    block: int,
    image_CE: torch.Tensor,
    token_CE: torch.Tensor,
    class_names: Sequence[str] | None = None,
    scores: dict | None = None,
    max_rows: int = MAX_ROWS,
) -> Path:
    """One PNG: image-level and token-level shares of MoE block `block`, classes in the same order on both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(class_names) if class_names is not None else [str(c) for c in range(image_CE.shape[0])]
    order = order_classes(row_shares(image_CE))
    img, labels, ylabel = _prepare(image_CE, order, names, max_rows)
    tok, _, _ = _prepare(token_CE, order, names, max_rows)
    height = 3.0 + 0.16 * min(img.shape[0], MAX_ROWS)
    fig = Figure(figsize=(4.0 + 0.5 * img.shape[1], height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    im = _draw(axes[0], img, labels, ylabel, "share of a class's images", 1.0)
    _draw(axes[1], tok, labels, "", "share of a class's tokens", 1.0)
    fig.colorbar(im, ax=list(axes), label="share routed to the expert", shrink=0.9)
    title = f"MoE block {block}: routing by class"
    if scores:
        title += (
            f"\nspecialisation {scores['specialisation']:.2f} (chance {scores['specialisation_chance']:.2f}), "
            f"NMI {scores['nmi']:.2f}, purity {scores['purity']:.2f}, load CV {scores['load_cv']:.2f}"
        )
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_overview(
    path: str | Path,
    image_matrices: dict[int, torch.Tensor],
    scores: dict[int, dict] | None = None,
    decisions: dict[int, str] | None = None,
    max_rows: int = MAX_ROWS,
) -> Path:
    """All MoE layers side by side (image level), each with its own class order, one shared colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = sorted(image_matrices)
    if not blocks:
        raise ValueError("no MoE layers to draw")
    fig = Figure(figsize=(max(6.0, 1.2 + 2.6 * len(blocks)), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(blocks), sharey=False, squeeze=False)[0]
    im = None
    for ax, block in zip(axes, blocks):
        m = image_matrices[block]
        names = [str(c) for c in range(m.shape[0])]
        data, labels, ylabel = _prepare(m, order_classes(row_shares(m)), names, max_rows)
        title = f"block {block}"
        if scores:
            title += f"\nspec. {scores[block]['specialisation']:.2f}"
        if decisions:
            title += f" ({decisions[block]})"
        im = _draw(ax, data, labels, ylabel if ax is axes[0] else "", title, 1.0)
    fig.colorbar(im, ax=list(axes), label="share of a class's images routed to the expert", shrink=0.9)
    fig.suptitle("Routing by class in every MoE layer", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
