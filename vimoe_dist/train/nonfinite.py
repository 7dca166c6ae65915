"""Where a non-finite loss came from, when it came from before the MoE layers: the input batch (a NaN image, a
normalisation that divides by zero) or the patch embedding (its weights, or its output overflowing).

Without this, a NaN that enters with the images reaches every router, and the first MoE block's router is blamed
(train/monitor.py's `bad_router` names the first router whose probabilities broke, which is right only when its
input was finite). Forward hooks keep, on the device and without a host sync, whether the last forward's input and
patch-embedding output were finite; they are read only after a step whose loss was not finite, so the happy path
costs two reductions per forward and no synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from vimoe_dist.parallel.collectives import all_reduce_min

EMBEDDING_PARAMS = ("patch_embed.", "pos_embed", "cls_token", "reg_token")
INPUT, EMBEDDING_WEIGHTS, EMBEDDING_OUTPUT, NONE = range(4)


class NonFiniteWatch:
    """Finiteness of the input and of the patch embedding in the last training forward of `model` (a timm ViT)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._input_ok: torch.Tensor | None = None
        self._embed_ok: torch.Tensor | None = None
        model.register_forward_pre_hook(self._input_hook)
        embed = getattr(model, "patch_embed", None)
        if embed is not None:
            embed.register_forward_hook(self._embed_hook)

    def _input_hook(self, module: nn.Module, args: tuple) -> None:
        if module.training and args and torch.is_tensor(args[0]):
            self._input_ok = torch.isfinite(args[0].detach()).all()

    def _embed_hook(self, module: nn.Module, args: tuple, output) -> None:
        if module.training and torch.is_tensor(output):
            self._embed_ok = torch.isfinite(output.detach()).all()

    def source(self, rank: int, world: int) -> str:
        """After a non-finite loss: the earliest cause before the MoE layers on any rank, described for the log, or ""
        when the input and the embedding were finite everywhere. A collective: call it on every rank."""
        kind = NONE
        if self._input_ok is not None and not bool(self._input_ok):
            kind = INPUT
        elif any(not torch.isfinite(p.detach()).all() for name, p in self._embedding_params()):
            kind = EMBEDDING_WEIGHTS
        elif self._embed_ok is not None and not bool(self._embed_ok):
            kind = EMBEDDING_OUTPUT
        code = int(all_reduce_min(torch.tensor([float(kind * world + rank)], dtype=torch.float64)).item())
        kind, bad_rank = divmod(code, world)
        if kind == INPUT:
            return f"the input batch has non-finite values on rank {bad_rank} (the data or its normalisation)"
        if kind == EMBEDDING_WEIGHTS:  # replicated weights: every rank names the same one
            bad = [n for n, p in self._embedding_params() if not torch.isfinite(p.detach()).all()]
            return f"the patch embedding has non-finite weights ({bad[0] if bad else '?'}) on rank {bad_rank}"
        if kind == EMBEDDING_OUTPUT:
            return f"the patch embedding's output is not finite on rank {bad_rank} (its input was)"
        return ""

    def _embedding_params(self):
        return ((n, p) for n, p in self.model.named_parameters() if n.startswith(EMBEDDING_PARAMS))
