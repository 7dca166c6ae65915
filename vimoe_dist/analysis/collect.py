"""One pass of the validation data through a ViMoE: routing statistics of every MoE layer and top-1 together.

The MoE layers record their combine weights (`record_routing`), the accumulator adds them up per class, and the
logits give the accuracy of the same pass. Padding images (`valid` False, which the validation loader adds so every
rank runs the same number of forwards) count nowhere. With several ranks, each rank sees its share of the data and
the sums are all-reduced at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vimoe_dist.analysis.accumulate import RoutingAccumulator
from vimoe_dist.errors import UserError


@dataclass
class RoutingPass:
    routing: RoutingAccumulator
    correct: int
    images: int

    @property
    def top1(self) -> float:
        return self.correct / self.images if self.images else 0.0


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels, valid) from a loader batch: a dict with image/label/valid (the validation loader's) or a
    tuple (images, labels[, valid])."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"], batch.get("valid")
    images, labels, *rest = batch
    return images, labels, rest[0] if rest else None


@torch.no_grad()
def run_routing(
    model: nn.Module, batches: Iterable, num_classes: int, device: torch.device | str = "cpu", desc: str | None = None
) -> RoutingPass:
    """Runs `batches` through `model` in eval mode, recording every MoE layer's routing; with `desc`, rank 0 shows
    progress under that name."""
    from vimoe_dist.metrics.progress import track
    from vimoe_dist.model import moe_layers
    from vimoe_dist.parallel import collectives

    layers = moe_layers(model)
    for block, layer in layers.items():
        if not hasattr(layer, "record_routing"):
            raise UserError(
                f"analyze: the MoE layer of block {block} ({type(layer).__name__}) cannot record routing; "
                "routing analysis needs ViMoE's own MoE layer (MoEFFN)"
            )
    acc = RoutingAccumulator(num_classes, {i: layer.num_experts for i, layer in layers.items()})
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    images = torch.zeros((), dtype=torch.long)
    try:
        for layer in layers.values():
            layer.record_routing = True
        rank0 = collectives.rank() == 0
        for batch in track(batches, desc, enabled=rank0) if desc else batches:
            x, labels, valid = unpack_batch(batch)
            out = model(x.to(device))
            logits = out[0] if isinstance(out, (tuple, list)) else out
            labels = labels.to("cpu", torch.long)
            keep = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.to("cpu", torch.bool)
            correct += ((logits.argmax(-1).cpu() == labels) & keep).sum()
            images += keep.sum()
            acc.update({i: layer.last_assignment for i, layer in layers.items()}, labels, keep)
    finally:
        for layer in layers.values():
            layer.record_routing = False
            layer.last_assignment = None
        model.train(was_training)
    acc.all_reduce()
    correct, images = _all_reduce_counts(correct, images)
    return RoutingPass(acc, correct, images)


def _all_reduce_counts(correct: torch.Tensor, images: torch.Tensor) -> tuple[int, int]:
    from vimoe_dist.parallel.collectives import sum_to_host

    correct, images = sum_to_host(torch.stack([correct, images]))
    return int(correct), int(images)
