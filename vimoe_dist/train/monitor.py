"""What the trainer watches in the MoE layers between two log steps: tokens per expert, drops, router entropy and
importance, expert collapse, and which router went bad after a non-finite loss."""

from __future__ import annotations

import logging

import torch

from vimoe_dist.config import Config
from vimoe_dist.model import aux_loss
from vimoe_dist.model.moe.layer import MoEFFN
from vimoe_dist.parallel.collectives import all_reduce_min

log = logging.getLogger("vimoe.train")


class RoutingMonitor:
    """MoE statistics between two log steps, accumulated on the device without a host sync, plus collapse
    detection: a warning (and an `expert_collapse` event) naming the block when one expert holds more than
    COLLAPSE_SHARE of the router's probability mass in COLLAPSE_LOGS consecutive logs.

    Collapse is judged on what the router wants (the mean of its probabilities over the routed units, the
    "importance" of Shazeer et al. 2017), not on the tokens the experts kept: capacity caps the kept tokens of the
    favourite expert, which hides a collapsed router behind balanced-looking counts.
    """

    COLLAPSE_SHARE = 0.9
    COLLAPSE_LOGS = 3

    def __init__(self, cfg: Config, layers: dict[int, MoEFFN]) -> None:
        """`layers`: block index -> MoE FFN (`vimoe_dist.model.moe_layers`)."""
        self.layers = dict(layers)
        self.acc: dict[int, dict[str, torch.Tensor]] = {}
        self.steps = 0
        self.collapsed_logs = dict.fromkeys(self.layers, 0)
        self.bad_block: int | None = None
        self._importance: dict[int, torch.Tensor] = {}  # of the last training forward, per block
        self._alltoall_seconds, self._alltoall_steps = 0.0, 0  # since the last log record
        for i, m in self.layers.items():
            m.router.register_forward_hook(self._importance_hook(i))

    def _importance_hook(self, i: int):
        def hook(module: torch.nn.Module, inputs: tuple, routing) -> None:
            if module.training:
                probs = routing.probs_GUE.detach()
                self._importance[i] = probs.reshape(-1, probs.shape[-1]).float().mean(0)

        return hook

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' auxiliary loss of the last forward, added to the task loss."""
        return aux_loss(self.layers)

    def accumulate(self) -> None:
        for i, m in self.layers.items():
            s = m.last_stats
            if not s:
                continue
            acc = self.acc.setdefault(i, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in s.items()})
            for k, v in s.items():
                acc[k] += v
            if i in self._importance:
                imp = self._importance.pop(i)
                acc.setdefault("importance", torch.zeros_like(imp, dtype=torch.float64)).add_(imp)
        self.steps += 1

    def take_alltoall_seconds(self) -> float:
        """Seconds the expert-parallel dispatchers spent in all-to-all since the last call (once per step)."""
        total = self._take_dispatcher_seconds()
        self._alltoall_seconds += total
        self._alltoall_steps += 1
        return total

    def discard_alltoall_seconds(self) -> None:
        """Forgets the all-to-all time of the forwards since the last step (an evaluation's): not training time."""
        self._take_dispatcher_seconds()

    def alltoall_seconds_per_step(self) -> float:
        """The mean all-to-all time per step since the last log record (0 without expert-parallel dispatch)."""
        mean = self._alltoall_seconds / max(self._alltoall_steps, 1)
        self._alltoall_seconds, self._alltoall_steps = 0.0, 0
        return mean

    def _take_dispatcher_seconds(self) -> float:
        total = 0.0
        for m in self.layers.values():
            d = m.dispatcher
            if hasattr(d, "seconds"):
                total += d.seconds
                d.seconds = 0.0
        return total

    def bad_router(self, rank: int, world: int) -> str:
        """After a non-finite loss: the first MoE block (in forward order, over all ranks) whose router went bad,
        described for the log ("" when every router looks finite). A collective: call it on every rank.

        A router "went bad" when its weights hold a NaN or inf, or when the routing probabilities of its last forward
        did (its input may then already have been bad: the block named is the first where routing broke).
        """
        found = world * (max(self.layers, default=0) + 1) * 2  # "none" sentinel, above every code below
        for i, m in self.layers.items():
            if any(not torch.isfinite(p.detach()).all() for p in m.router.parameters()):
                found = min(found, (2 * i) * world + rank)
            entropy = m.last_stats.get("entropy") if m.last_stats else None
            if entropy is not None and not torch.isfinite(entropy).all():
                found = min(found, (2 * i + 1) * world + rank)
        code = all_reduce_min(torch.tensor([found], dtype=torch.float64))
        code_i = int(code.item())
        if code_i >= world * (max(self.layers, default=0) + 1) * 2:
            self.bad_block = None
            return ""
        kind, bad_rank = divmod(code_i, world)
        self.bad_block, outputs = divmod(kind, 2)
        what = "non-finite routing probabilities" if outputs else "non-finite weights"
        return f"the router of MoE block {self.bad_block} has {what} on rank {bad_rank}"

    def report(self, step: int, metrics) -> dict:
        out = {}
        for i, acc in self.acc.items():
            tokens = acc["tokens"].tolist()
            total = sum(tokens)
            mean = total / max(len(tokens), 1)
            out[str(i)] = {
                "tokens": [int(x) for x in tokens],
                "dropped": int(acc["dropped"].item()),
                "entropy": acc["entropy"].item() / max(self.steps, 1),
                "imbalance": max(tokens) / mean if mean else 0.0,
            }
            importance = acc["importance"].tolist() if "importance" in acc else []
            mass = sum(importance)
            share = max(importance) / mass if mass > 0 else 0.0
            self.collapsed_logs[i] = (
                self.collapsed_logs[i] + 1 if share > self.COLLAPSE_SHARE and len(importance) > 1 else 0
            )
            if self.collapsed_logs[i] == self.COLLAPSE_LOGS:
                expert = importance.index(max(importance))
                log.warning("step %d: expert collapse in MoE block %d: expert %d holds %.0f%% of the router's "
                            "probability mass (%d logs in a row)", step, i, expert, 100 * share,
                            self.COLLAPSE_LOGS)  # fmt: skip
                metrics.on_event("expert_collapse", step=step, layer=i, expert=expert, share=share)
        self.acc.clear()
        self.steps = 0
        return out
