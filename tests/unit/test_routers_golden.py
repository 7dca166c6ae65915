"""Golden routings derived by hand, one small case (at least) per router.

Each case routes one group of units x = identity (unit u is the one-hot e_u), so the gate's weight column u is
unit u's logits; logits are set to log(gates) so the softmax gates are exactly the numbers written here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vimoe_dist.model.moe.routers import build_router
from vimoe_dist.model.moe.routers.sparse_ot import project_sparse_simplex, sparse_ot_semi_dual


def routed(name: str, logits_UE: torch.Tensor, **opts):
    U, E = logits_UE.shape
    router = build_router(name, U, E, **opts).eval()
    with torch.no_grad():
        router.gate.weight.copy_(logits_UE.T)
    return router(torch.eye(U))


def slots_of(routing) -> dict[int, list[int]]:
    """Expert -> the units in its slots, in slot order."""
    d_UEC = routing.dispatch
    return {
        e: [int(d_UEC[:, e, c].argmax()) for c in range(d_UEC.shape[2]) if d_UEC[:, e, c].any()]
        for e in range(d_UEC.shape[1])
    }


# ---------------------------------------------------------------- tc-softmax
# Three units, two experts, every unit prefers expert 0 with gates 0.6, 0.9, 0.7.
# k=1, cf=0.5: C = ceil(1 * 3 * 0.5 / 2) = ceil(0.75) = 1, so expert 0 keeps exactly one unit.
ALL_PREFER_E0 = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]).log()


def test_tc_softmax_bpr_keeps_the_most_confident_unit() -> None:
    # BPR fills buffers by top gate: u1 (0.9) first, so expert 0 holds u1; u0 and u2 are dropped
    r = routed("tc-softmax", ALL_PREFER_E0, top_k=1, capacity_factor=0.5, bpr=True)
    assert r.capacity == 1 and slots_of(r) == {0: [1], 1: []}
    assert r.combine[1, 0, 0].item() == pytest.approx(0.9)
    assert r.dropped_units().item() == 2


def test_tc_softmax_without_bpr_serves_input_order() -> None:
    # without BPR the first unit in input order, u0 (0.6), takes the only slot: a different kept set
    r = routed("tc-softmax", ALL_PREFER_E0, top_k=1, capacity_factor=0.5, bpr=False)
    assert slots_of(r) == {0: [0], 1: []}
    assert r.combine[0, 0, 0].item() == pytest.approx(0.6)


def test_tc_softmax_renormalize_keeps_bpr_order() -> None:
    # renormalised over k=1 every weight is 1; the priority must still be the raw gate (u1 first)
    r = routed("tc-softmax", ALL_PREFER_E0, top_k=1, capacity_factor=0.5, bpr=True, renormalize=True)
    assert slots_of(r) == {0: [1], 1: []}
    assert r.combine[1, 0, 0].item() == pytest.approx(1.0)


def test_tc_softmax_dropless() -> None:
    # capacity_factor None: C = U = 3 and no unit is dropped; BPR order gives slots u1 (0.9), u2 (0.7), u0 (0.6)
    r = routed("tc-softmax", ALL_PREFER_E0, top_k=1, capacity_factor=None, bpr=True)
    assert r.capacity == 3 and slots_of(r) == {0: [1, 2, 0], 1: []}
    assert r.dropped_units().item() == 0
    torch.testing.assert_close(r.unit_expert_weights(), torch.tensor([[0.6, 0.0], [0.9, 0.0], [0.7, 0.0]]))


def test_tc_softmax_second_choices_wait_for_all_first_choices() -> None:
    # gates: u0 (0.3, 0.7), u1 (0.8, 0.2), u2 (0.6, 0.4); k=2, cf=0.5: C = ceil(2 * 3 * 0.5 / 2) = 2; input order.
    # first choices: u0->e1 (e1 slot 0), u1->e0 (e0 slot 0), u2->e0 (e0 slot 1);
    # second choices: u0->e0 (full, dropped), u1->e1 (e1 slot 1), u2->e1 (full, dropped).
    # Serving u0's two choices before u1's would instead fill e0 with u0, u1 and drop u2 altogether.
    logits = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.6, 0.4]]).log()
    r = routed("tc-softmax", logits, top_k=2, capacity_factor=0.5, bpr=False)
    assert r.capacity == 2 and slots_of(r) == {0: [1, 2], 1: [0, 1]}
    assert r.dropped_units().item() == 0
    torch.testing.assert_close(r.unit_expert_weights(), torch.tensor([[0.0, 0.7], [0.8, 0.2], [0.6, 0.0]]))


def test_tc_softmax_renormalize_over_top_k() -> None:
    # u0 gates (0.5, 0.3, 0.2), k=2: chosen e0, e1 with 0.5 and 0.3, renormalised 0.5/0.8 = 0.625 and 0.375
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    r = routed("tc-softmax", logits, top_k=2, capacity_factor=None, renormalize=True)
    torch.testing.assert_close(r.unit_expert_weights(), torch.tensor([[0.625, 0.375, 0.0]]))
    plain = routed("tc-softmax", logits, top_k=2, capacity_factor=None, renormalize=False)
    torch.testing.assert_close(plain.unit_expert_weights(), torch.tensor([[0.5, 0.3, 0.0]]))


def test_tc_softmax_switch_loss_in_aux() -> None:
    # every first choice is e0: f = (1, 0); mean gates P = (2.2/3, 0.8/3); E * sum f P = 2 * 2.2 / 3
    r = routed("tc-softmax", ALL_PREFER_E0, top_k=1, capacity_factor=None, switch_loss=0.1)
    assert r.aux_loss.item() == pytest.approx(0.1 * 2 * 2.2 / 3)


# ---------------------------------------------------------------- Sinkhorn routers
# Built backwards from the balanced plan: P* below is doubly stochastic (rows and columns sum to 1), and
# K = P* diag(1/c) with c = (1, 1, 1/8). Sinkhorn scales rows and columns of K = exp(logits), and the unique plan of
# the form diag(r) K diag(c') with uniform marginals is P* / 3 (r = 1, c' = c). So Sinkhorn selects by P*, while the
# softmax gates are the rows of K normalised (the default 10 iterations come close enough to keep P*'s ranking):
#   u0: K (0.1, 0.4, 4.0), sum 4.5  -> gates (0.0222, 0.0889, 0.8889)
#   u1: K (0.4, 0.35, 2.0), sum 2.75 -> gates (0.1455, 0.1273, 0.7273)
#   u2: K (0.5, 0.25, 2.0), sum 2.75 -> gates (0.1818, 0.0909, 0.7273)
P_STAR = torch.tensor([[0.1, 0.4, 0.5], [0.4, 0.35, 0.25], [0.5, 0.25, 0.25]])
K = P_STAR / torch.tensor([1.0, 1.0, 1 / 8])


def test_tc_sinkhorn_picks_by_balanced_plan() -> None:
    # k=1 dropless: row argmax of P*: u0->e2, u1->e0, u2->e0; weights are the gates 4/4.5, 0.4/2.75, 0.5/2.75.
    # (tc-softmax sends everyone to e2, the argmax of each row of K.)
    r = routed("tc-sinkhorn", K.log(), top_k=1, capacity_factor=None)
    expected = torch.tensor([[0.0, 0.0, 4.0 / 4.5], [0.4 / 2.75, 0.0, 0.0], [0.5 / 2.75, 0.0, 0.0]])
    torch.testing.assert_close(r.unit_expert_weights(), expected)
    plain = routed("tc-softmax", K.log(), top_k=1, capacity_factor=None)
    assert plain.unit_expert_weights().argmax(-1).tolist() == [2, 2, 2]


def test_ec_sinkhorn_picks_by_balanced_plan() -> None:
    # C = ceil(1 * 3 * 1 / 3) = 1: column argmax of P*: e0<-u2 (0.5), e1<-u0 (0.4), e2<-u0 (0.5); u1 is dropped.
    # ec-softmax ranks e1's column of gates (0.0889, 0.1273, 0.0909) and takes u1 instead.
    r = routed("ec-sinkhorn", K.log(), top_k=1, capacity_factor=1.0)
    assert slots_of(r) == {0: [2], 1: [0], 2: [0]}
    assert r.dropped_units().item() == 1
    expected = torch.tensor([[0.0, 0.4 / 4.5, 4.0 / 4.5], [0.0, 0.0, 0.0], [0.5 / 2.75, 0.0, 0.0]])
    torch.testing.assert_close(r.unit_expert_weights(), expected)
    plain = routed("ec-softmax", K.log(), top_k=1, capacity_factor=1.0)
    assert slots_of(plain) == {0: [2], 1: [1], 2: [0]}


# ---------------------------------------------------------------- Expert Choice: softmax and sparsity-constrained
# Six units, three experts, k=1, cf=1: C = ceil(6 / 3) = 2.
GATES_6x3 = torch.tensor(
    [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.4, 0.5, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]]
)


def test_ec_softmax_takes_top_c_per_expert() -> None:
    # e0's column (0.6, 0.5, 0.4, 0.2, 0.3, 0.1) -> u0, u1; e1's (0.3, 0.4, 0.5, 0.2, 0.3, 0.1) -> u2, u1;
    # e2's (0.1, 0.1, 0.1, 0.6, 0.4, 0.8) -> u5, u3. u1 is served twice, u4 by nobody.
    r = routed("ec-softmax", GATES_6x3.log(), top_k=1, capacity_factor=1.0)
    assert r.capacity == 2 and slots_of(r) == {0: [0, 1], 1: [2, 1], 2: [5, 3]}
    assert r.dropped_units().item() == 1 and r.units_per_expert().tolist() == [2, 2, 2]
    torch.testing.assert_close(r.combine.sum(-1), GATES_6x3 * r.dispatch.sum(-1))


def test_project_sparse_simplex_by_hand() -> None:
    v = torch.tensor([[[0.5, 0.4, 0.1, 0.3]]])
    # two non-zeros: keep 0.5, 0.4; theta = (0.9 - 1) / 2 = -0.05 -> (0.55, 0.45)
    torch.testing.assert_close(project_sparse_simplex(v, 2), torch.tensor([[[0.55, 0.45, 0.0, 0.0]]]))
    # no sparsity limit: sorted (0.5, 0.4, 0.3, 0.1) all stay in the support, theta = (1.3 - 1) / 4 = 0.075
    torch.testing.assert_close(project_sparse_simplex(v, 4), torch.tensor([[[0.425, 0.325, 0.025, 0.225]]]))
    # a dominant entry takes all the mass: (2, 0) -> theta = 1 -> (1, 0)
    torch.testing.assert_close(
        project_sparse_simplex(torch.tensor([[[2.0, 0.0, 0.0]]]), 2), torch.tensor([[[1.0, 0, 0]]])
    )


def test_ec_sparse_balances_where_ec_softmax_drops() -> None:
    # The plan counts each unit as mass 1 and each expert as U/E = 2 with at most C = 2 non-zeros. 3 experts x 2
    # non-zeros = 6 entries for 6 units that each need mass, so every unit sits in exactly one column with mass 1:
    # the feasible plans are the partitions into pairs, all with the same l2 penalty, and the best one maximises
    # the similarity, the sum of the softmax gates (as the authors' router, sim_matrix = gates):
    #   e0{u0,u1} e1{u2,u4} e2{u3,u5}: 0.6+0.5 + 0.5+0.3 + 0.6+0.8 = 3.3   <- the optimum
    #   e0{u0,u4} e1{u1,u2} e2{u3,u5}: 0.6+0.3 + 0.4+0.5 + 0.6+0.8 = 3.2
    #   e0{u0,u2} e1{u1,u4} e2{u3,u5}: 0.6+0.4 + 0.4+0.3 + 0.6+0.8 = 3.1
    #   e0{u0,u1} e1{u2,u3} e2{u4,u5}: 0.6+0.5 + 0.5+0.2 + 0.4+0.8 = 3.0
    # (any partition giving e2 a unit other than u3, u5, u4 trades a gate of 0.6-0.8 for 0.1 and is worse still).
    r = routed("ec-sparse", GATES_6x3.log(), top_k=1, capacity_factor=1.0)
    assert {e: sorted(units) for e, units in slots_of(r).items()} == {0: [0, 1], 1: [2, 4], 2: [3, 5]}
    assert r.dropped_units().item() == 0
    # weights are the softmax gates, not the plan
    expected = torch.zeros(6, 3)
    for e, units in {0: [0, 1], 1: [2, 4], 2: [3, 5]}.items():
        expected[units, e] = GATES_6x3[units, e]
    torch.testing.assert_close(r.unit_expert_weights(), expected)

    _, plan_GUE = sparse_ot_semi_dual(GATES_6x3[None], 2, 1.0, 50)
    torch.testing.assert_close(plan_GUE[0], (expected > 0).float(), atol=1e-2, rtol=0)

    # the enumeration above, checked exhaustively over all 90 ways to pair the units with the experts
    def total(assign: tuple[int, ...]) -> float:
        return sum(GATES_6x3[u, e].item() for u, e in enumerate(assign))

    feasible = [a for a in itertools.product(range(3), repeat=6) if all(a.count(e) == 2 for e in range(3))]
    assert len(feasible) == 90
    assert max(feasible, key=total) == (0, 0, 1, 2, 1, 2)


# Three units, three experts, k=1, cf=1: C = 1, so every feasible plan is a permutation (u -> e); gates:
#   u0 (0.09, 0.18, 0.73)   u1 (0.06, 0.82, 0.12)   u2 (0.04, 0.54, 0.42)
# permutation (e of u0, u1, u2): sum of gates / sum of log-gates
#   (0, 1, 2): 0.09 + 0.82 + 0.42 = 1.33 / ln(0.09 * 0.82 * 0.42) = ln 0.0310 = -3.47   <- best for log-gates
#   (0, 2, 1): 0.09 + 0.12 + 0.54 = 0.75 / ln 0.0058 = -5.14
#   (1, 0, 2): 0.18 + 0.06 + 0.42 = 0.66 / ln 0.0045 = -5.40
#   (1, 2, 0): 0.18 + 0.12 + 0.04 = 0.34 / ln 0.0009 = -7.05
#   (2, 0, 1): 0.73 + 0.06 + 0.54 = 1.33 / ln 0.0237 = -3.74
#   (2, 1, 0): 0.73 + 0.82 + 0.04 = 1.59 / ln 0.0239 = -3.73                            <- best for the gates
GATES_3x3 = torch.tensor([[0.09, 0.18, 0.73], [0.06, 0.82, 0.12], [0.04, 0.54, 0.42]])


def test_ec_sparse_similarity_is_the_softmax_gate() -> None:
    # the authors' similarity (the gates) sends u0 -> e2, u1 -> e1, u2 -> e0; log-gates would pick (0, 1, 2)
    r = routed("ec-sparse", GATES_3x3.log(), top_k=1, capacity_factor=1.0)
    assert slots_of(r) == {0: [2], 1: [1], 2: [0]}
    assert r.dropped_units().item() == 0
    _, plan_GUE = sparse_ot_semi_dual(GATES_3x3.log()[None], 1, 1.0, 50)
    assert plan_GUE[0].argmax(-1).tolist() == [0, 1, 2]  # the solver itself, given log-gates
    # ec-softmax on the same gates: e0 takes u0 (0.09), e1 u1 (0.82), e2 u0 (0.73); u2 is dropped
    assert slots_of(routed("ec-softmax", GATES_3x3.log(), top_k=1, capacity_factor=1.0)) == {0: [0], 1: [1], 2: [0]}


def test_ec_sparse_without_iterations_is_ec_softmax() -> None:
    r = routed("ec-sparse", GATES_6x3.log(), top_k=1, capacity_factor=1.0, sparse_iters=0)
    assert slots_of(r) == {0: [0, 1], 1: [2, 1], 2: [5, 3]}


# ---------------------------------------------------------------- Soft MoE
def test_soft_moe_by_hand() -> None:
    # D = 2, two experts with one slot each. Slot parameters (7, 0) and (0, 0.5) normalise to e_0 and e_1; units
    # (2, 0), (0, 3), (3, 4) normalise to e_0, e_1, (0.6, 0.8). With scale 5 ln 2 the logits are ln of
    #   u0: (2^5, 2^0) = (32, 1);  u1: (1, 32);  u2: (2^3, 2^4) = (8, 16)
    # dispatch (softmax over units, per slot): e0 (32, 1, 8) / 41, e1 (1, 32, 16) / 49;
    # combine (softmax over slots, per unit): u0 (32, 1) / 33, u1 (1, 32) / 33, u2 (8, 16) / 24.
    router = build_router("soft", 2, 2, slots_per_expert=1, z_loss=0.5).eval()
    with torch.no_grad():
        router.phi.copy_(torch.tensor([[7.0, 0.0], [0.0, 0.5]]))
        router.scale.fill_(5 * math.log(2))
    r = router(torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0]]))
    dispatch = torch.tensor([[32 / 41, 1 / 49], [1 / 41, 32 / 49], [8 / 41, 16 / 49]])
    combine = torch.tensor([[32 / 33, 1 / 33], [1 / 33, 32 / 33], [8 / 24, 16 / 24]])
    torch.testing.assert_close(r.dispatch[..., 0], dispatch)
    torch.testing.assert_close(r.combine[..., 0], combine)
    assert r.capacity == 1 and r.dropped_units().item() == 0 and r.units_per_expert().tolist() == [1, 1]
    # z-loss over each unit's slot logits: mean of (ln 33)^2, (ln 33)^2, (ln 24)^2
    z = (2 * math.log(33) ** 2 + math.log(24) ** 2) / 3
    assert r.aux_loss.item() == pytest.approx(0.5 * z, rel=1e-5)


@pytest.mark.parametrize(
    ("units", "capacity_factor", "slots"),
    # round(U * cf / E) with E = 4, Python's round (halves to even) as vmoe's compute_capacity(..., 'round'):
    # 8 * 1.0 / 4 = 2;  8 * 1.25 / 4 = 2.5 -> 2;  8 * 1.5 / 4 = 3;  12 * 1.25 / 4 = 3.75 -> 4;  4 * 0.5 / 4 = 0.5 -> 0
    [(8, 1.0, 2), (8, 1.25, 2), (8, 1.5, 3), (12, 1.25, 4)],
)
def test_soft_slots_from_capacity_factor(units: int, capacity_factor: float, slots: int) -> None:
    router = build_router("soft", 2, 4, capacity_factor=capacity_factor, num_units=units)
    assert router.slots_per_expert == slots and router.phi.shape == (2, 4 * slots)
    r = router(torch.randn(units, 2))
    assert r.capacity == slots and r.units_per_expert().tolist() == [slots] * 4
    # an explicit slots_per_expert wins over the capacity factor
    assert build_router("soft", 2, 4, slots_per_expert=5, capacity_factor=1.0, num_units=units).slots_per_expert == 5


def test_soft_slots_that_round_to_zero_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"capacity_factor: round\(4 units x 0.5 / 4 experts\) = 0 slots"):
        build_router("soft", 2, 4, capacity_factor=0.5, num_units=4)
    with pytest.raises(ValueError, match="slots_per_expert"):
        build_router("soft", 2, 4, capacity_factor=1.0)  # no slots and no group size to derive them from


def test_soft_noise_only_while_training() -> None:
    # noise_std is absolute for Soft MoE (vmoe SoftRouter.add_noise): the combine weights move while training,
    # and evaluation is noise-free (equal to a router without noise)
    torch.manual_seed(0)
    noisy = build_router("soft", 4, 2, slots_per_expert=1, noise_std=1.0)
    clean = build_router("soft", 4, 2, slots_per_expert=1)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(noisy.eval()(x).combine, clean.eval()(x).combine)
    assert not torch.allclose(noisy.train()(x).combine, clean.train()(x).combine)
