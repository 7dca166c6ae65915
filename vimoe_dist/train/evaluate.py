"""Evaluation over the whole validation set exactly once: sharded over ranks, sums reduced over all of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vimoe_dist.metrics.progress import track
from vimoe_dist.parallel.collectives import all_reduce_sum, any_rank


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    should_stop: Callable[[], bool] | None = None,
    confusion_CC: torch.Tensor | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
    progress: bool = False,
) -> dict | None:
    """top-1, top-5, mean loss and image count. Every rank must call it (the MoE all-to-all is a collective in every
    forward); padding samples (`valid` False) run through the model but are not counted.

    With `should_stop` (the trainer's preemption flag) the ranks agree before every batch whether any of them wants
    to stop, and leave together, returning None: a signal that arrives during a long evaluation must not spend the
    grace time that the checkpoint needs.

    With `confusion_CC` (classes x classes, float64, on `device`), image counts of (true class, top-1 prediction)
    are added to it and summed over ranks, for per-class accuracy and confusions (`vimoe eval --per-class`).

    `on_batch(labels, valid)` runs after each forward (the trainer records the routing there for the heatmaps,
    train/eval_routing.py); `progress` shows it (a bar on a terminal, plain lines in a log: pass it on rank 0 only).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, images
    for batch in track(loader, "eval", enabled=progress):
        if should_stop is not None and any_rank(should_stop(), device):
            model.train(was_training)
            return None
        images = batch["image"].to(device, non_blocking=True).to(dtype)
        labels = batch["label"].to(device, non_blocking=True)
        valid = batch.get("valid")
        valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.to(device)
        logits = model(images)
        if on_batch is not None:
            on_batch(batch["label"], batch.get("valid"))
        logits = (logits[0] if isinstance(logits, tuple) else logits).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == labels[:, None]
        v = valid.to(torch.float64)
        sums[0] += (hit[:, 0].double() * v).sum()
        sums[1] += (hit.any(-1).double() * v).sum()
        sums[2] += (F.cross_entropy(logits, labels, reduction="none").double() * v).sum()
        sums[3] += v.sum()
        if confusion_CC is not None:
            confusion_CC.index_put_((labels, top[:, 0]), v, accumulate=True)
    all_reduce_sum(sums)
    if confusion_CC is not None:
        all_reduce_sum(confusion_CC)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": sums[0].item() / n, "top5": sums[1].item() / n, "loss": sums[2].item() / n, "images": int(sums[3])}
