"""kill -9 of a rank in the middle of a checkpoint save: the other rank exits non-zero naming the dead rank, the
half-written checkpoint is never taken for complete (neither our `latest` nor DeepSpeed's names it), the previous
checkpoint is the one resumed, and the resumed run ends with the weights of a run that never failed."""

from __future__ import annotations

import pytest
from conftest import STEPS, assert_same_weights, final_weights

from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
from vimoe_dist.train.checkpoint import latest_tag

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_kill_9_during_save_keeps_the_previous_checkpoint(jobs, reference, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    job = jobs.start(out, faults="kill_in_save@8:rank=1")
    code = job.finish()
    log = job.log
    assert code != 0, log[-3000:]
    assert "test hook: kill_in_save at step 8 (SIGKILL)" in log, log[-3000:]
    assert "rank 0: a collective failed or timed out" in log and "rank 1 did not answer" in log, log[-3000:]

    # the crashed save left debris that nothing takes for a checkpoint
    assert (root / "step_00000008").is_dir() and not (root / "step_00000008" / "COMPLETE").exists()
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert latest_tag(root) == "step_00000004"
    # the previous checkpoint is intact: the uninterrupted run's weights at step 4
    assert_same_weights(
        single_device_state_dict(reference / "checkpoints", "step_00000004"),
        single_device_state_dict(root, "step_00000004"),
    )

    # rerun: resumes from step 4, redoes the save of step 8 from scratch, ends as if nothing happened
    job = jobs.run(out)
    assert f"resumed from {root / 'step_00000004'} at step 4" in job.log
    assert (root / "step_00000008" / "COMPLETE").is_file() and latest_tag(root) == f"step_{STEPS:08d}"
    assert_same_weights(final_weights(reference), final_weights(out))
