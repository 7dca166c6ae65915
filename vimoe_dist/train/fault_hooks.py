"""Test hooks: real faults injected into a training run at a chosen step, for the fault suite (`tests/faults/`).

Off unless the environment variable `VIMOE_TEST_FAULTS` is set (without it the hooks hold no fault and do nothing);
the trainer calls them at step boundaries and inside a checkpoint save, never in the forward or backward pass.
Never set it in a real run.

    VIMOE_TEST_FAULTS="kill_in_save@8:rank=1,nan_router@5:block=1:rank=0"

Each item is `action@step` with optional `:rank=R` (default: every rank) and `:block=B` (an MoE block index):

- `kill@S`: SIGKILL this rank just before step S (a crashed node);
- `stop@S`: SIGSTOP this rank just before step S (a hung rank: it holds its sockets and never answers);
- `kill_in_save@S`: SIGKILL this rank inside the save of step S, after its own state file is written and before
  DeepSpeed's files (a crash in the middle of a checkpoint);
- `term_in_eval@S`: SIGTERM to this rank as the evaluation after step S starts (a preemption during evaluation);
- `nan_router@S`: the router of block B outputs NaN logits during step S only (a transient overflow);
- `poison_router@S`: the router weights of block B become NaN before step S (a corrupted update; stays);
- `collapse@S`: from step S on, the router of block B sends every unit to expert 0 (expert collapse).

`kill`, `stop`, `kill_in_save` and `term_in_eval` fire once per run directory (a marker file records it), so a
restarted job (torchrun `--max-restarts`, a requeue) runs on past the fault instead of meeting it again.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from vimoe_dist.errors import UserError

log = logging.getLogger("vimoe.train")

ENV = "VIMOE_TEST_FAULTS"
ACTIONS = ("kill", "stop", "kill_in_save", "term_in_eval", "nan_router", "poison_router", "collapse")
ONCE = ("kill", "stop", "kill_in_save", "term_in_eval")
COLLAPSE_LOGIT = 1.0e4


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    rank: int | None = None
    block: int | None = None


def parse_faults(text: str) -> list[Fault]:
    """`action@step[:rank=R][:block=B],...` -> faults; a malformed item is a UserError naming it."""
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        head, *opts = item.split(":")
        action, _, step = head.partition("@")
        if action not in ACTIONS or not step.isdigit():
            raise UserError(f"{ENV}: bad item {item!r} (expected action@step with action in {', '.join(ACTIONS)})")
        fields: dict[str, int] = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in ("rank", "block") or not value.lstrip("-").isdigit():
                raise UserError(f"{ENV}: bad option {opt!r} in {item!r} (expected rank=R or block=B)")
            fields[key] = int(value)
        if action in ("nan_router", "poison_router", "collapse") and "block" not in fields:
            raise UserError(f"{ENV}: {item!r} needs :block=B (an MoE block index)")
        faults.append(Fault(action, int(step), **fields))
    return faults


def build_fault_hooks(run_dir: Path, rank: int, layers: dict) -> FaultHooks:
    """The hooks of this rank; without `VIMOE_TEST_FAULTS` (every real run) they hold no fault and do nothing.
    `layers`: block index -> MoE FFN (`vimoe_dist.model.moe_layers`)."""
    text = os.environ.get(ENV, "").strip()
    faults = [f for f in parse_faults(text) if f.rank is None or f.rank == rank] if text else []
    for f in faults:
        if f.block is not None and f.block not in layers:
            raise UserError(f"{ENV}: block {f.block} is not an MoE block (MoE blocks: {sorted(layers)})")
    if faults:
        log.warning("rank %d: test fault hooks armed: %s", rank, faults)
    return FaultHooks(faults, run_dir, rank, layers)


class FaultHooks:
    """Fires the faults of one rank; `before_step(s)` runs before step s (1-based, as logged), `in_save(s)` inside
    the save of step s, `before_eval(s)` as the evaluation after step s starts. Without faults each call is a
    loop over nothing."""

    def __init__(self, faults: list[Fault], run_dir: Path, rank: int, layers: dict) -> None:
        self.faults, self.run_dir, self.rank, self.layers = faults, Path(run_dir), rank, layers
        self._transient: list[torch.utils.hooks.RemovableHandle] = []

    def before_step(self, step: int) -> None:
        for handle in self._transient:
            handle.remove()
        self._transient.clear()
        for f in self.faults:
            if f.action == "collapse" and step == f.step:
                self._gate(f.block).register_forward_hook(_collapse_to_expert_0)
                log.warning("rank %d: test hook: router of MoE block %d forced to expert 0", self.rank, f.block)
            elif f.action == "nan_router" and step == f.step:
                self._transient.append(self._gate(f.block).register_forward_hook(_nan_output))
                log.warning("rank %d: test hook: router of MoE block %d outputs NaN in step %d", self.rank, f.block,
                            step)  # fmt: skip
            elif f.action == "poison_router" and step == f.step:
                with torch.no_grad():
                    for p in self.layers[f.block].router.parameters():
                        p.fill_(float("nan"))
                log.warning("rank %d: test hook: router weights of MoE block %d set to NaN", self.rank, f.block)
            elif f.action in ("kill", "stop") and step == f.step:
                self._fire_once(f, signal.SIGKILL if f.action == "kill" else signal.SIGSTOP)

    def before_eval(self, step: int) -> None:
        for f in self.faults:
            if f.action == "term_in_eval" and step == f.step:
                self._fire_once(f, signal.SIGTERM)

    def in_save(self, step: int) -> None:
        for f in self.faults:
            if f.action == "kill_in_save" and step == f.step:
                self._fire_once(f, signal.SIGKILL)

    def _gate(self, block: int) -> torch.nn.Module:
        router = self.layers[block].router
        if not hasattr(router, "gate"):
            raise UserError(f"{ENV}: the router of block {block} ({type(router).__name__}) has no linear gate to hook")
        return router.gate

    def _fire_once(self, f: Fault, sig: signal.Signals) -> None:
        marker = self.run_dir / f".test_fault_{f.action}_{f.step}_rank{self.rank}"
        if marker.exists():
            return
        marker.write_text("fired\n")
        log.warning("rank %d: test hook: %s at step %d (%s)", self.rank, f.action, f.step, sig.name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), sig)


def _nan_output(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.full_like(output, float("nan"))


def _collapse_to_expert_0(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    out = output.clone()
    out[..., 0] = out[..., 0] + COLLAPSE_LOGIT
    return out
