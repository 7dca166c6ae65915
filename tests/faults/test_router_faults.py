"""Router faults, injected through the test hooks (vimoe_dist/train/fault_hooks.py) into real training runs:

- a transient NaN in one rank's router (block 1, rank 1, step 5): every rank skips that step's update, the log and
  `metrics.jsonl` name the step, the block and the rank, no checkpoint holds the bad update (the checkpoint of step 5
  equals that of step 4) and training goes on;
- a router forced to expert 0 (block 0): the expert-collapse warning names the block, the other block stays quiet;
- router weights turned to NaN (a corrupted update that stays): the non-finite weights are never checkpointed and
  the run stops after `train.max_bad_steps` with one line naming the key and the block.

A skipped step changes the run by design (its batch is not learned from), so here the check is "the checkpoint after
the bad step equals the one before it", not equality with a run that never failed.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_weights

from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _events(out, name: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def test_transient_nan_is_skipped_named_and_never_saved_and_collapse_is_named(jobs, tmp_path):
    out = tmp_path / "run"
    job = jobs.run(
        out, "model.moe.routing=token", "train.steps=8", "train.checkpoint_every=1",
        faults="nan_router@5:block=1:rank=1,collapse@3:block=0",
    )  # fmt: skip
    log = job.log
    msg = "step 5: non-finite loss, update skipped (the router of MoE block 1 has non-finite routing probabilities on "
    assert f"rank0] WARNING {msg}rank 1)" in log and f"rank1] WARNING {msg}rank 1)" in log, log[-3000:]
    (event,) = _events(out, "nonfinite_loss")
    assert event["step"] == 5 and event["layer"] == 1, event
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and "event" not in r}  # fmt: skip
    assert losses[5] is None and all(losses[s] is not None for s in losses if s != 5), losses

    root = out / "checkpoints"
    ckpt = {s: single_device_state_dict(root, f"step_{s:08d}") for s in (4, 5, 6)}
    assert_same_weights(ckpt[4], ckpt[5])  # step 5 changed nothing
    assert any(not ckpt[5][k].equal(ckpt[6][k]) for k in ckpt[5])  # step 6 trained again
    assert all(v.isfinite().all() for state in ckpt.values() for v in state.values() if v.is_floating_point())

    assert "expert collapse in MoE block 0: expert 0 holds" in log, log[-3000:]
    assert "expert collapse in MoE block 1" not in log
    assert {e["layer"] for e in _events(out, "expert_collapse")} == {0}


def test_nan_weights_are_never_saved_and_max_bad_steps_stops_the_run(jobs, tmp_path):
    out = tmp_path / "run"
    job = jobs.run(
        out, "parallel.ep_size=1", "train.max_bad_steps=4", nproc=1, expect=2,
        faults="poison_router@6:block=1",
    )  # fmt: skip
    log = job.log
    errors = [line for line in log.splitlines() if "vimoe train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert "train.max_bad_steps: 5 consecutive non-finite losses up to step 10" in errors[0], errors
    assert "the router of MoE block 1 has non-finite weights on rank 0" in errors[0], errors
    assert "not saving step_00000008: parameter blocks.1.mlp" in log, log[-3000:]
    root = out / "checkpoints"
    assert latest_tag(root) == "step_00000004" and not (root / "step_00000008").exists()
    assert [e["step"] for e in _events(out, "nonfinite_loss")] == [6, 7, 8, 9, 10]
    assert [e["step"] for e in _events(out, "checkpoint_refused_nonfinite")] == [8]
