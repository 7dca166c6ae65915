"""What `vimoe checkpoint info` says a rank reads, and which layouts a checkpoint can move to (no DeepSpeed run:
layouts are plain values)."""

import pytest

from vimoe_dist.errors import UserError
from vimoe_dist.parallel.checkpoint_plan import compress, rank_files, target_layout
from vimoe_dist.parallel.layout import Layout, layout_from_states

SAVED = Layout(world_size=4, ep_size=4, zero_stage=1, precision="bf16", num_experts=(8, 8), routers=("tc-softmax",) * 2)


def test_under_zero_0_the_number_of_ranks_may_change_and_deepspeed_still_reads_its_files():
    zero0 = Layout(4, 2, 0, "fp32", (4, 4))
    assert zero0.same_optimizer_files(Layout(2, 2, 0, "fp32", (4, 4)))
    assert not SAVED.same_optimizer_files(Layout(2, 4, 1, "bf16", (8, 8)))  # ZeRO partitions are per rank
    assert compress(rank_files(zero0, Layout(2, 2, 0, "fp32", (4, 4)), 1, False)) == [
        "mp_rank_00_model_states.pt",
        "layer_0_expert_{2..3}_mp_rank_00_model_states.pt",
        "layer_1_expert_{2..3}_mp_rank_00_model_states.pt",
        "expp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_at_the_saved_layout_a_rank_reads_its_own_files():
    files = rank_files(SAVED, SAVED, 3, layout_free=False)
    assert compress(files) == [
        "mp_rank_00_model_states.pt",
        "layer_0_expert_{6..7}_mp_rank_00_model_states.pt",
        "layer_1_expert_{6..7}_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "vimoe_rank_00003.pt",
    ]


def test_at_another_layout_a_rank_reads_every_optimizer_file_or_its_share_of_the_layout_free_form():
    target = target_layout(SAVED, 2, 2, "checkpoint x")
    assert target.experts_per_rank == 4 and not SAVED.same_optimizer_files(target)
    converted = compress(rank_files(SAVED, target, 1, layout_free=False))
    assert converted == [
        "mp_rank_00_model_states.pt",
        "layer_0_expert_{4..7}_mp_rank_00_model_states.pt",
        "layer_1_expert_{4..7}_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_{0..3}_mp_rank_00_optim_states.pt",  # no data position: the world size changed
    ]
    shared = compress(rank_files(SAVED, target, 1, layout_free=True))
    assert shared[-3:] == ["vimoe_optim/dense.pt", "vimoe_optim/layer_0_expert_{4..7}.pt",
                           "vimoe_optim/layer_1_expert_{4..7}.pt"]  # fmt: skip


@pytest.mark.parametrize(
    ("ep", "world", "says"),
    [(3, 3, "ep_size 3 does not divide the 8 experts"), (4, 2, "ep_size 4 does not divide the 2 ranks")],
)
def test_a_layout_the_checkpoint_cannot_fit_names_both(ep, world, says):
    with pytest.raises(UserError) as e:
        target_layout(SAVED, ep, world, "checkpoint 'x'")
    assert str(e.value) == (f"checkpoint 'x', saved at {SAVED.describe()}, cannot resume at ep_size {ep} on {world} "
                            f"ranks: {says}")  # fmt: skip
    assert (
        SAVED.describe()
        == "4 ranks, ep_size 4, ZeRO 1, bf16: 2 MoE layers of 8 experts (2 per rank), router tc-softmax"
    )


def test_a_checkpoint_saved_before_the_layout_record_is_read_from_deepspeeds_fields():
    states = {"ep_size": 2, "world_size": 4, "num_experts": [4, 4],
              "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}}  # fmt: skip
    assert layout_from_states(states, "f") == Layout(4, 2, 2, "bf16", (4, 4))
    assert layout_from_states({"ep_size": 1, "ds_config": {}}, "f") == Layout(1, 1, 0, "fp32", ())  # a dense model
    with pytest.raises(UserError, match="was not written by vimoe train"):
        layout_from_states({"module": {}}, "f")
    assert layout_from_states({"vimoe_layout": SAVED.record()}, "f") == SAVED
