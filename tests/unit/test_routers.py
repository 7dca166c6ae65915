"""Properties every router in ROUTERS must have, checked on the dense D and C tensors of the unified formulation
("Routers in Vision MoE", Liu et al. 2024) and on the index form the MoE layer uses.

Shape legend: G groups, U units per group, R rows per unit, D model dim, E experts, C slots per expert, A assignments.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vimoe_dist.model.moe.routers import ROUTERS, SoftRouting, SparseRouting, build_router

DIM = 8
ALL = sorted(ROUTERS)
TOKEN_CHOICE = ("tc-softmax", "tc-sinkhorn")
EXPERT_CHOICE = ("ec-softmax", "ec-sinkhorn", "ec-sparse")


def router_options(name: str, top_k: int, capacity_factor: float | None, slots: int, bpr: bool, renorm: bool) -> dict:
    if name == "soft":
        return {"slots_per_expert": slots}
    if name in EXPERT_CHOICE:
        return {"top_k": top_k, "capacity_factor": 1.0 if capacity_factor is None else capacity_factor}
    return {"top_k": top_k, "capacity_factor": capacity_factor, "bpr": bpr, "renormalize": renorm}


@st.composite
def cases(draw: st.DrawFn) -> dict:
    num_experts = draw(st.integers(1, 8))
    return {
        "groups": draw(st.integers(1, 2)),
        "units": draw(st.integers(1, 24)),
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "capacity_factor": draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0, None])),
        "slots": draw(st.integers(1, 3)),
        "bpr": draw(st.booleans()),
        "renorm": draw(st.booleans()),
        "tie": draw(st.booleans()),  # duplicate a unit: equal scores must not break any invariant
        "seed": draw(st.integers(0, 2**16)),
    }


def route(name: str, case: dict) -> tuple[torch.nn.Module, torch.Tensor, object]:
    torch.manual_seed(case["seed"])
    opts = router_options(name, case["top_k"], case["capacity_factor"], case["slots"], case["bpr"], case["renorm"])
    router = build_router(name, DIM, case["num_experts"], **opts).eval()
    x_GUD = torch.randn(case["groups"], case["units"], DIM)
    if case["tie"] and case["units"] > 1:
        x_GUD[:, 1] = x_GUD[:, 0]
    return router, x_GUD, router(x_GUD)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_invariants(name: str, case: dict) -> None:
    router, x_GUD, routing = route(name, case)
    G, U, E = case["groups"], case["units"], case["num_experts"]
    d_GUEC, c_GUEC = routing.dispatch, routing.combine
    C = routing.capacity
    assert d_GUEC.shape == c_GUEC.shape == (G, U, E, C)
    assert (d_GUEC >= 0).all() and (c_GUEC >= 0).all()
    # combine is zero where dispatch is
    assert (c_GUEC[d_GUEC == 0] == 0).all()
    # the counters agree with an independent count on the dense D
    reached_GU = (d_GUEC > 0).flatten(2).any(-1)
    assert routing.dropped_units().item() == (~reached_GU).sum().item()
    filled_GEC = (d_GUEC > 0).any(1)  # a slot is filled if any unit has weight in it
    assert routing.units_per_expert().tolist() == filled_GEC.sum(dim=(0, 2)).tolist()
    torch.testing.assert_close(routing.unit_expert_weights(), c_GUEC.sum(-1).flatten(0, 1))
    torch.testing.assert_close(routing.probs_GUE.sum(-1), torch.ones(G, U))

    if name == "soft":
        assert isinstance(routing, SoftRouting)
        assert routing.capacity == case["slots"]
        torch.testing.assert_close(d_GUEC.sum(1), torch.ones(G, E, C))  # each slot: a convex mix of units
        torch.testing.assert_close(c_GUEC.sum(dim=(2, 3)), torch.ones(G, U))  # each unit: a convex mix of slots
        return

    assert isinstance(routing, SparseRouting)
    # index form: every assignment within capacity, each (group, expert, slot) holds at most one unit
    assert (routing.slot_A >= 0).all() and (routing.slot_A < C).all()
    group_A = routing.unit_A // U
    slot_keys = ((group_A * E + routing.expert_A) * C + routing.slot_A).tolist()
    assert len(set(slot_keys)) == len(slot_keys)
    pair_keys = (routing.unit_A * E + routing.expert_A).tolist()
    assert len(set(pair_keys)) == len(pair_keys), "a unit sits twice in one expert"
    assert (d_GUEC.sum(1) <= 1).all() and set(d_GUEC.unique().tolist()) <= {0.0, 1.0}
    per_unit_U = torch.bincount(routing.unit_A, minlength=G * U)
    if name in TOKEN_CHOICE:
        assert per_unit_U.max().item() <= case["top_k"]
        if case["capacity_factor"] is None:  # dropless: every unit gets all k choices
            assert C == U and (per_unit_U == case["top_k"]).all()
            assert routing.dropped_units().item() == 0
        gates_A = routing.probs_GUE.flatten(0, 1)[routing.unit_A, routing.expert_A]
        if not case["renorm"]:
            torch.testing.assert_close(routing.weight_A, gates_A)
    else:
        # expert choice fills every expert with exactly C units in every group
        assert (d_GUEC.sum(1) == 1).all()
        assert routing.units_per_expert().tolist() == [G * C] * E


def dense_moe(x_GURD: torch.Tensor, d_GUEC: torch.Tensor, c_GUEC: torch.Tensor, w_EDD, b_ED) -> torch.Tensor:
    """The unified formulation computed densely: slot inputs, experts on every slot, combined back."""
    slots_GECRD = torch.einsum("gurd,guec->gecrd", x_GURD, d_GUEC)
    out_GECRD = torch.tanh(torch.einsum("gecrd,edf->gecrf", slots_GECRD, w_EDD) + b_ED[None, :, None, None])
    return torch.einsum("gecrd,guec->gurd", out_GECRD, c_GUEC)


def expert_bank(x_XD: torch.Tensor, counts_E: torch.Tensor, w_EDD, b_ED) -> torch.Tensor:
    """Experts applied to their rows in expert-major order, as the MoE layer does (one distinct expert each)."""
    chunks = torch.split(x_XD, counts_E.tolist())
    return torch.cat([torch.tanh(chunk @ w_EDD[e] + b_ED[e]) for e, chunk in enumerate(chunks)])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("rows", [1, 3], ids=["token-units", "image-units"])
@settings(max_examples=10, deadline=None)
@given(case=cases())
def test_index_form_matches_dense_einsum(name: str, rows: int, case: dict) -> None:
    router, x_GUD, routing = route(name, case)
    G, U, E = case["groups"], case["units"], case["num_experts"]
    x_GURD = torch.randn(G, U, rows, DIM)
    w_EDD, b_ED = torch.randn(E, DIM, DIM), torch.randn(E, DIM)
    d_GUEC, c_GUEC = routing.dispatch_GUEC(), routing.combine_GUEC()

    x_XD, counts_E = routing.gather(x_GURD)
    # rows come in expert-major order: expert, then group, then slot, then the unit's rows (empty slots skipped)
    slots_EGCRD = torch.einsum("gurd,guec->egcrd", x_GURD, d_GUEC)
    filled_EGC = (d_GUEC > 0).any(1).permute(1, 0, 2)
    torch.testing.assert_close(x_XD, slots_EGCRD[filled_EGC].reshape(-1, DIM))
    assert counts_E.tolist() == (routing.units_per_expert() * rows).tolist()

    y_GURD = routing.scatter(expert_bank(x_XD, counts_E, w_EDD, b_ED), x_GURD.shape)
    torch.testing.assert_close(y_GURD, dense_moe(x_GURD, d_GUEC, c_GUEC, w_EDD, b_ED))


@pytest.mark.parametrize("name", ALL)
def test_groups_are_independent(name: str) -> None:
    torch.manual_seed(0)
    opts = router_options(name, top_k=2, capacity_factor=1.0, slots=2, bpr=True, renorm=False)
    router = build_router(name, DIM, 4, **opts).eval()
    x_GUD = torch.randn(2, 12, DIM)
    before = router(x_GUD)
    x_GUD[1] = 5 * torch.randn(12, DIM)
    after = router(x_GUD)
    alone = router(x_GUD[0])  # group 0 routed on its own ([T, D] input) must not differ either
    for other in (after, alone):
        d = other.dispatch if other is alone else other.dispatch[0]
        c = other.combine if other is alone else other.combine[0]
        torch.testing.assert_close(d, before.dispatch[0])
        torch.testing.assert_close(c, before.combine[0])
    assert not torch.equal(after.combine[1], before.combine[1])  # the change did reach group 1


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_router_through_combine_weights(name: str) -> None:
    torch.manual_seed(0)
    opts = router_options(name, top_k=2, capacity_factor=1.0, slots=2, bpr=True, renorm=False)
    router = build_router(name, DIM, 4, **opts)
    x_GURD = torch.randn(2, 6, 3, DIM)
    routing = router(x_GURD.mean(2))
    assert routing.aux_loss.item() == 0  # no auxiliary loss configured: the only path is the routing weights
    w_EDD, b_ED = torch.randn(4, DIM, DIM), torch.randn(4, DIM)
    x_XD, counts_E = routing.gather(x_GURD)
    y_GURD = routing.scatter(expert_bank(x_XD, counts_E, w_EDD, b_ED), x_GURD.shape)
    (y_GURD * torch.randn_like(y_GURD)).sum().backward()
    params = dict(router.named_parameters())
    assert set(params) == ({"phi", "scale"} if name == "soft" else {"gate.weight"})
    for pname, param in params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


def test_build_router_unknown_name() -> None:
    with pytest.raises(ValueError, match="'tc-nope'"):
        build_router("tc-nope", DIM, 4)


@pytest.mark.parametrize("name", ALL)
def test_build_router_unknown_option(name: str) -> None:
    with pytest.raises(ValueError, match="'capacity_fctor'"):
        build_router(name, DIM, 4, capacity_fctor=1.0)


@pytest.mark.parametrize("name", ALL)
def test_build_router_top_k_above_num_experts(name: str) -> None:
    # soft has no top_k at all: the unknown-option error names it just the same
    with pytest.raises(ValueError, match="top_k"):
        build_router(name, DIM, 4, top_k=5)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("ec-sparse", "sparse_gamma", 0.0), ("ec-sparse", "sparse_iters", -1), ("soft", "slots_per_expert", 0)],
)
def test_build_router_bad_values_name_the_option(name: str, option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        build_router(name, DIM, 4, **{option: value})


def test_soft_warns_about_ignored_balancing_losses() -> None:
    with pytest.warns(UserWarning, match="switch_loss"):
        build_router("soft", DIM, 4, slots_per_expert=1, switch_loss=0.01)


@pytest.mark.parametrize("name", ALL)
def test_noise_std_perturbs_training_routing_only(name: str) -> None:
    # every router takes noise_std (V-MoE's token and expert choice, vmoe's SoftRouter); evaluation is noise-free
    torch.manual_seed(0)
    opts = router_options(name, top_k=1, capacity_factor=None, slots=1, bpr=True, renorm=False)
    noisy = build_router(name, DIM, 4, noise_std=4.0, **opts)
    clean = build_router(name, DIM, 4, **opts)
    clean.load_state_dict(noisy.state_dict())
    x_GUD = torch.randn(2, 16, DIM)
    torch.testing.assert_close(noisy.eval()(x_GUD).combine, clean.eval()(x_GUD).combine)
    assert not torch.allclose(noisy.train()(x_GUD).combine, clean.train()(x_GUD).combine)


@pytest.mark.parametrize(("routing", "slots"), [("image", 2), ("token", 34)])
def test_soft_slots_from_the_config_capacity_factor(routing: str, slots: int) -> None:
    # slots_per_expert null: round(U * cf / E) for the U units of a routing group; cf 4, E 4, groups of 2 images of
    # 16 px at patch 4 (16 patches + 1 class token = 17 tokens): image routing U = 2 -> 2 slots per expert; token
    # routing U = 2 * 17 = 34 -> 34 slots per expert. The model builder tells the router the tokens per image.
    from vimoe_dist.config import load_config
    from vimoe_dist.model import build_model, moe_layers

    cfg = load_config(
        None,
        [
            "model.backbone=vit_tiny_patch16_224",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
            "model.img_size=16",
            "model.num_classes=3",
            "model.moe.router=soft",
            "model.moe.switch_loss=0",
            "model.moe.num_experts=4",
            "model.moe.group_size=2",
            "model.moe.capacity_factor=4.0",
            f"model.moe.routing={routing}",
        ],
    )
    layer = next(iter(moe_layers(build_model(cfg.model)).values()))
    assert layer.router.slots_per_expert == slots


def test_soft_slots_that_round_to_zero_are_a_config_error() -> None:
    # groups of 2 images, cf 1, 4 experts: round(2 * 1 / 4) = round(0.5) = 0 slots; the error names the config key
    from vimoe_dist.config import ConfigError, load_config
    from vimoe_dist.model import build_model

    cfg = load_config(
        None,
        [
            "model.backbone=vit_tiny_patch16_224",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
            "model.img_size=16",
            "model.moe.router=soft",
            "model.moe.num_experts=4",
            "model.moe.group_size=2",
            "model.moe.capacity_factor=1.0",
        ],
    )
    with pytest.raises(ConfigError, match=r"^model\.moe\.capacity_factor: round\(2 units x 1.0 / 4 experts\) = 0"):
        build_model(cfg.model)
