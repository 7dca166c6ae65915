"""What counts as a checkpoint, without processes: only a tag with `COMPLETE`; `latest` pointing at debris (a tag
whose save never finished) falls back to the newest complete tag; the step of a tag comes from its name; `latest`
and tag names never lead out of the run's own `checkpoints/` (an absolute path, `..`, a symbolic link, bytes that are
not text), and a save replaces a symlinked tag instead of writing through it. And the test-hook grammar refuses
malformed items (a typo must not silently arm nothing)."""

from __future__ import annotations

import os

import pytest

from vimoe_dist.errors import UserError
from vimoe_dist.train.checkpoint import _clear_tag_dir, _prune, latest_tag, resolve_checkpoint, step_of
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


# --- a run's checkpoints are its own: `latest` and tag names never lead out of `checkpoints/`


@pytest.fixture
def two_runs(tmp_path):
    """This run's checkpoints (complete step 4, crashed step 8) and another run's newer complete tag."""
    own, other = tmp_path / "run" / "checkpoints", tmp_path / "other" / "checkpoints"
    _tag(own, 4, complete=True)
    _tag(own, 8, complete=False)
    _tag(other, 12, complete=True)
    return own, other


@pytest.mark.parametrize(
    "latest",
    [
        "ABSOLUTE",  # replaced below by the other run's tag as an absolute path
        "../../other/checkpoints/step_00000012",
        "..",
        "step_00000008",  # debris of a crashed save
        b"\xff\xfe\x80step_00000004",  # not UTF-8
        b"step_00000004" * 1000,  # not a tag name at all
    ],
)
def test_latest_never_leads_out_of_the_run(two_runs, latest, caplog):
    own, other = two_runs
    if latest == "ABSOLUTE":
        latest = str(other / "step_00000012")
    (own / "latest").write_bytes(latest if isinstance(latest, bytes) else latest.encode())
    with caplog.at_level("WARNING"):
        assert latest_tag(own) == "step_00000004"
        assert latest_tag(own) == "step_00000004"
    warnings = [r.getMessage() for r in caplog.records if "latest" in r.getMessage()]
    assert len(warnings) == 1 and "using step_00000004" in warnings[0], warnings  # once, not per call
    assert resolve_checkpoint(own.parent) == (own, "step_00000004")


def test_symlinked_or_special_tags_are_not_this_runs(two_runs):
    own, other = two_runs
    (own / "step_00000016").symlink_to(other / "step_00000012")  # a tag that is another run's directory
    assert latest_tag(own) == "step_00000004"  # scanning skips it
    (own / "latest").write_text("step_00000016")
    assert latest_tag(own) == "step_00000004"  # and `latest` cannot name it
    os.mkfifo(own / "latest.fifo")
    (own / "latest").unlink()
    (own / "latest").symlink_to(own / "latest.fifo")  # a FIFO would block the reader forever
    assert latest_tag(own) == "step_00000004"


def test_a_save_replaces_a_symlinked_tag_and_never_writes_through_it(two_runs):
    own, other = two_runs
    target = other / "step_00000012"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir())
    (own / "step_00000012").symlink_to(target)
    assert _clear_tag_dir(own / "step_00000012") == ""
    assert not (own / "step_00000012").exists() and not (own / "step_00000012").is_symlink()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir()) == before
    _prune(own, keep=1)  # pruning never follows a link into another run either
    (own / "step_00000016").symlink_to(target)
    _prune(own, keep=1)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir()) == before


def test_resume_never_refuses_a_directory_with_complete_checkpoints(two_runs, tmp_path):
    from vimoe_dist.config import load_config
    from vimoe_dist.train.checkpoint import find_resume

    own, _ = two_runs
    cfg = load_config("configs/digits.yaml", [f"run.out_dir={own.parent}", "run.resume=never"])
    with pytest.raises(
        UserError, match=r"run.resume=never: .* already holds a run \(latest checkpoint step_00000004\)"
    ):
        find_resume(cfg, own)
    assert find_resume(cfg, tmp_path / "fresh" / "checkpoints") is None  # nothing to lose: a fresh start
