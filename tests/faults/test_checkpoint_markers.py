"""What counts as a checkpoint, without processes: only a tag with `COMPLETE`; `latest` pointing at debris (a tag
whose save never finished) falls back to the newest complete tag; the step of a tag comes from its name. And the
test-hook grammar refuses malformed items (a typo must not silently arm nothing)."""

from __future__ import annotations

import pytest

from vimoe_dist.errors import UserError
from vimoe_dist.train.checkpoint import latest_tag, resolve_checkpoint, step_of
from vimoe_dist.train.fault_hooks import Fault, parse_faults


def _tag(root, step: int, complete: bool) -> str:
    name = f"step_{step:08d}"
    (root / name).mkdir(parents=True)
    (root / name / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (root / name / "COMPLETE").write_text("2\n")
    return name


def test_only_complete_tags_count(tmp_path):
    assert latest_tag(tmp_path) is None and latest_tag(tmp_path / "missing") is None
    t4 = _tag(tmp_path, 4, complete=True)
    _tag(tmp_path, 8, complete=False)  # a crashed save
    assert latest_tag(tmp_path) == t4  # no `latest` file: scan
    (tmp_path / "latest").write_text("step_00000008")  # even if `latest` named it (DeepSpeed's would have)
    assert latest_tag(tmp_path) == t4
    (tmp_path / "latest").write_text(t4)
    assert latest_tag(tmp_path) == t4 and resolve_checkpoint(tmp_path) == (tmp_path, t4)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "step_00000008")
    assert step_of(tmp_path, t4) == 4


@pytest.mark.parametrize(
    "text", ["kill", "kill@x", "explode@3", "kill@3:rank", "kill@3:node=1", "nan_router@3", "collapse@2:rank=0"]
)
def test_malformed_fault_items_are_refused(text):
    with pytest.raises(UserError, match="VIMOE_TEST_FAULTS"):
        parse_faults(text)


def test_fault_items_parse():
    assert parse_faults("kill_in_save@8:rank=1, nan_router@5:block=1:rank=0") == [
        Fault("kill_in_save", 8, rank=1),
        Fault("nan_router", 5, rank=0, block=1),
    ]
