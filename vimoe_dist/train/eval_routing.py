"""Routing heatmaps for the experiment trackers at each evaluation: class x expert shares of every MoE layer, drawn
as `vimoe analyze routing` draws them (`vimoe_dist.analysis.heatmaps.plot_layer`; ViMoE, Han et al. 2024, Fig. 5),
so TensorBoard and W&B show the experts specialising over training.

No second pass over the data: while the evaluation runs, rank 0's MoE layers record their routing
(`record_routing`) and the recorder adds each batch to a `RoutingAccumulator`, for rank 0's share of the validation
set up to `MAX_IMAGES` images (then recording stops: the figure needs a sample, not every image). Only rank 0 draws
and nothing is reduced, so the other ranks neither wait for it nor need to know whether a tracker is on. The PNGs are
kept under `RUN/routing/step_NNNNNNNN/` and handed to `metrics.on_image` as `routing/block_<i>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vimoe_dist.analysis.accumulate import RoutingAccumulator

MAX_IMAGES = 10_000  # per evaluation: 10 per class on ImageNet-1k; the heatmaps bin 1000 classes into 64 rows


class EvalRouting:
    """Records the routing of the evaluation batches of this rank, while used as a context manager.

    Args:
        layers: block index -> MoE FFN (`vimoe_dist.model.moe_layers`).
        num_classes: `model.num_classes`.
        max_images: images recorded at most.
    """

    def __init__(self, layers: dict[int, nn.Module], num_classes: int, max_images: int = MAX_IMAGES) -> None:
        self.layers = dict(layers)
        self.acc = RoutingAccumulator(num_classes, {i: m.num_experts for i, m in self.layers.items()})
        self.max_images = max_images
        self.images = 0

    def __enter__(self) -> EvalRouting:
        self._record(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._record(False)

    def _record(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.record_routing = on
            layer.last_assignment = None

    def update(self, labels: torch.Tensor, valid: torch.Tensor | None) -> None:
        """After the forward of one evaluation batch: adds its routing (padding images left out)."""
        if self.images >= self.max_images:
            return
        assignments = {i: m.last_assignment for i, m in self.layers.items()}
        if any(a is None for a in assignments.values()):
            return
        self.acc.update(assignments, labels, valid)
        self.images += int(labels.numel() if valid is None else valid.sum())
        if self.images >= self.max_images:
            self._record(False)

    def draw(self, out_dir: str | Path, step: int, class_names: list[str] | None = None) -> dict[str, Path]:
        """One PNG per MoE layer in `out_dir`; returns tag -> file (`routing/block_<i>`)."""
        from vimoe_dist.analysis.heatmaps import plot_layer

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for block, layer in self.acc.layers.items():
            path = out / f"block_{block:02d}.png"
            paths[f"routing/block_{block}"] = plot_layer(
                path, block, layer.image_weight_CE, layer.token_weight_CE, class_names
            )
        return paths


def class_names_of(cfg: Any) -> list[str] | None:
    """The data set's class names for the heatmaps' rows, or None (rows are then class indices)."""
    try:
        from vimoe_dist.data.check import class_names

        return class_names(cfg)
    except Exception:  # naming rows is a nicety: a manifest that cannot be read leaves the indices
        return None
