"""The sparsity-constrained transport solver behind `ec-sparse` (Liu, Puigcerver and Blondel, ICLR 2023).

Shape legend: G groups, U units per group, E experts, C non-zeros allowed per expert column.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vimoe_dist.model.moe.routers import build_router
from vimoe_dist.model.moe.routers.sparse_ot import sparse_ot_semi_dual


@settings(max_examples=30, deadline=None)
@given(
    units=st.integers(1, 24),
    num_experts=st.integers(1, 6),
    capacity_factor=st.sampled_from([0.5, 1.0, 2.0]),
    gamma=st.sampled_from([0.05, 1.0, 20.0]),
    num_iters=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_plan_columns_meet_their_constraints(units, num_experts, capacity_factor, gamma, num_iters, seed) -> None:
    torch.manual_seed(seed)
    cap = min(units, math.ceil(units * capacity_factor / num_experts))
    scores_GUE = torch.randn(2, units, num_experts).log_softmax(-1)
    alpha_GU, plan_GUE = sparse_ot_semi_dual(scores_GUE, cap, gamma, num_iters)
    assert (plan_GUE >= 0).all()
    # every expert column carries its mass U/E on at most C units, whatever the iteration count
    torch.testing.assert_close(plan_GUE.sum(1), torch.full((2, num_experts), units / num_experts))
    assert ((plan_GUE > 0).sum(1) <= cap).all()
    # the units an expert selects (top-C of score + potential) include every unit of its column's support
    picked_GEC = (scores_GUE + alpha_GU[..., None]).topk(cap, dim=1).indices.transpose(1, 2)
    picked_GUE = torch.zeros_like(plan_GUE).scatter_(1, picked_GEC.transpose(1, 2), 1.0) > 0
    assert picked_GUE[plan_GUE > 0].all()


def test_plan_rows_converge_when_the_problem_is_smooth() -> None:
    # gamma small against the score spread: the plan's own support is below C, the semi-dual is smooth, and the
    # accelerated gradient drives every unit's mass to 1 (the row marginal)
    torch.manual_seed(0)
    scores_GUE = torch.randn(2, 64, 8).log_softmax(-1)
    _, plan_GUE = sparse_ot_semi_dual(scores_GUE, 16, gamma=0.1, num_iters=300)
    torch.testing.assert_close(plan_GUE.sum(-1), torch.ones(2, 64), atol=2e-3, rtol=0)


def test_ec_sparse_drops_fewer_units_than_ec_softmax() -> None:
    # the reason for the router: the unit potentials balance the experts' picks, so fewer units go unserved
    torch.manual_seed(0)
    x_GUD = torch.randn(8, 64, 16)
    softmax = build_router("ec-softmax", 16, 8, capacity_factor=1.0).eval()
    sparse = build_router("ec-sparse", 16, 8, capacity_factor=1.0).eval()
    with torch.no_grad():
        sparse.gate.weight.copy_(softmax.gate.weight)
    dropped_softmax = softmax(x_GUD).dropped_units().item()
    dropped_sparse = sparse(x_GUD).dropped_units().item()
    assert dropped_sparse < dropped_softmax / 3, (dropped_sparse, dropped_softmax)
