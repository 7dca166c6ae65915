"""Sparsity-constrained optimal transport for Expert Choice routing (`ec-sparse`).

The plan matches the units of a group (rows) with the experts (columns): a squared-l2-regularised transport plan whose
every column has at most C non-zeros ("Sparsity-Constrained Optimal Transport", Liu, Puigcerver and Blondel, ICLR 2023),
solved in the semi-dual, where each column's subproblem is a projection onto the simplex restricted to C non-zeros.

Shape legend:
    G: routing groups   U: units per group   E: experts   C: capacity (non-zeros per expert column)
"""

from __future__ import annotations

import math

import torch

from vimoe_dist.model.moe.routers.expert_choice import ExpertChoice


def project_sparse_simplex(v_GEU: torch.Tensor, max_nonzero: int) -> torch.Tensor:
    """Euclidean projection of each row of `v_GEU` onto the probability simplex restricted to at most `max_nonzero`
    non-zeros.

    The best k-sparse point of the simplex keeps the k largest coordinates and projects them onto the simplex
    (Kyrillidis et al., ICML 2013, "Sparse projections onto the simplex"); the projection of those k is the sorted
    threshold rule of Duchi et al. (ICML 2008): y = max(v - theta, 0) with theta chosen so that y sums to one.
    """
    top_GEK, index_GEK = v_GEU.topk(max_nonzero, dim=-1)  # sorted, largest first
    excess_GEK = top_GEK.cumsum(-1) - 1.0
    rank_K = torch.arange(1, max_nonzero + 1, device=v_GEU.device, dtype=v_GEU.dtype)
    # the support is a prefix of the sorted values; its size rho is at least 1 (the first test is always 1 > 0)
    rho_GE1 = (top_GEK - excess_GEK / rank_K > 0).sum(-1, keepdim=True)
    theta_GE1 = excess_GEK.gather(-1, rho_GE1 - 1) / rho_GE1
    y_GEK = (top_GEK - theta_GE1).clamp_min(0.0)
    return torch.zeros_like(v_GEU).scatter(-1, index_GEK, y_GEK)


def column_plan(scores_GUE: torch.Tensor, alpha_GU: torch.Tensor, max_nonzero: int, gamma: float) -> torch.Tensor:
    """The plan the semi-dual potential `alpha_GU` implies, counted in units (each row should sum to 1, each column
    sums to U / E): column e is (U/E) * P_C((s_e + alpha) / (gamma U / E)), P_C the sparse simplex projection."""
    U, E = scores_GUE.shape[-2:]
    mass = U / E
    v_GEU = (scores_GUE + alpha_GU[..., None]).transpose(1, 2) / (mass * gamma)
    return mass * project_sparse_simplex(v_GEU, max_nonzero).transpose(1, 2)


@torch.no_grad()
def sparse_ot_semi_dual(
    scores_GUE: torch.Tensor, max_nonzero: int, gamma: float, num_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solves the sparsity-constrained, l2-regularised transport between units and experts in the semi-dual.

    Primal, per group: max_T <T, S> - (gamma / 2) ||T||^2 over plans T >= 0 whose rows sum to 1 (each unit is one unit
    of mass), whose columns sum to U / E and have at most `max_nonzero` non-zeros. In the marginals of the paper (1/U
    per unit, 1/E per expert) this is P = T / U with regulariser (gamma U / 2) ||P||^2: counting the plan in units makes
    `gamma` a quantity in the units of the scores, so its effect does not change with the group size.

    Semi-dual (the row constraints dualised with a potential alpha per unit), minimised:
        F(alpha) = sum_e max_{y in (U/E) simplex, ||y||_0 <= C} [<s_e + alpha, y> - (gamma/2) ||y||^2] - sum_u alpha_u,
    convex, with gradient T(alpha) 1 - 1 (minus each unit's missing mass; `column_plan` gives T(alpha)). Its smooth
    pieces have curvature at most E / gamma, but where the cardinality constraint binds (gamma large against the
    spread of the scores) it is only piecewise smooth and a fixed step gamma / E overshoots the kinks and cycles. So
    the iteration is Nesterov's accelerated gradient with step min(gamma, sigma / sqrt(t + 1)) / E, sigma the spread
    (standard deviation) of the group's scores: the smooth step while it is the smaller, else the classic decaying
    subgradient step in the units of the scores. A fixed number of iterations keeps the cost predictable (and the
    routing a deterministic function of the group's scores). In that binding regime the cardinality constraint is not
    convex, so even the exact dual optimum may leave some rows short of their mass; and if C * E < U the row marginals
    cannot all be met at all and the potentials of starved units keep rising. The plan is then a best effort; its
    columns always meet their constraints exactly.

    Returns:
        alpha_GU, the unit potentials (the units expert e selects are the top-C of s_e + alpha), and the plan T_GUE.
    """
    s_GUE = scores_GUE.float()
    E = s_GUE.shape[-1]
    spread_G1 = s_GUE.flatten(1).std(-1, unbiased=False).clamp_min(1e-6)[:, None]
    alpha_GU = s_GUE.new_zeros(s_GUE.shape[:-1])
    lookahead_GU = alpha_GU
    for t in range(num_iters):
        missing_GU = 1.0 - column_plan(s_GUE, lookahead_GU, max_nonzero, gamma).sum(-1)
        step_G1 = (spread_G1 / math.sqrt(t + 1)).clamp_max(gamma) / E
        new_GU = lookahead_GU + step_G1 * missing_GU  # under-served units get a higher potential
        lookahead_GU = new_GU + (t / (t + 3)) * (new_GU - alpha_GU)
        alpha_GU = new_GU
    return alpha_GU, column_plan(s_GUE, alpha_GU, max_nonzero, gamma)


class ExpertChoiceSparse(ExpertChoice):
    """Sparsity-constrained Expert Choice (`ec-sparse`; "Routers in Vision MoE", Liu et al., TMLR 2024, built on
    "Sparsity-Constrained Optimal Transport", Liu, Puigcerver and Blondel, ICLR 2023), as the authors' router
    (vmoe `projects/sparsity_constrained_ot/ksparse_projection_routing.py`, the TopItemsPerExpert variant) does it.

    Steps, per routing group:
      1. gates = softmax over experts of x W (+ the optional noise of `ec-softmax`), in fp32; C = ceil(k U cf / E);
      2. a transport plan between units (each of mass 1) and experts (each of mass U/E) maximises <plan, gates> -
         (sparse_gamma / 2) ||plan||^2 with at most C non-zeros per expert column: the similarity is the softmax
         gate itself (the authors pass `sim_matrix=gates_softmax`, cost = -gates) and the regulariser the squared
         l2 norm with gamma = 1 (the authors' value, our default). It is solved in the semi-dual with `sparse_iters`
         steps of accelerated gradient (`sparse_ot_semi_dual`; the authors take 20 Adam steps of the same
         objective), which yields one potential alpha_u per unit that raises the units no expert wanted;
      3. expert e takes the units where its column of the plan is non-zero - the top entries of gate_e + alpha -
         and, when the column has fewer than C non-zeros, the next best units by the same score, so every buffer is
         full as in every Expert Choice router (the authors take the top-C of the plan, whose ties at zero fall
         to arbitrary units);
      4. each output is weighted by the unit's softmax gate, not by the plan (the authors' default,
         `use_softmax_combine_weights=True`): the plan is computed without gradient.

    The similarity matters. On the gates, placing a unit with an expert it gives a small gate loses at most that
    unit's top gate; on log-gates (an earlier version of this router) the loss grows without bound as the gate goes
    to 0, so the plan avoids such placements at any price, and the two select different units in a large share of
    groups (`test_routers_golden.py` has a case by hand). With `sparse_iters=0` (alpha = 0) the router is exactly
    `ec-softmax`.
    """

    def __init__(self, dim: int, num_experts: int, sparse_gamma: float = 1.0, sparse_iters: int = 50, **kw) -> None:
        if not sparse_gamma > 0 or not math.isfinite(sparse_gamma):
            raise ValueError(f"sparse_gamma: must be a finite number > 0, got {sparse_gamma!r}")
        if sparse_iters < 0:
            raise ValueError(f"sparse_iters: must be >= 0, got {sparse_iters!r}")
        super().__init__(dim, num_experts, **kw)
        self.sparse_gamma, self.sparse_iters = sparse_gamma, sparse_iters

    def selection_scores(self, logits_GUE: torch.Tensor, probs_GUE: torch.Tensor, capacity: int) -> torch.Tensor:
        gates_GUE = probs_GUE.detach().float()
        alpha_GU, _ = sparse_ot_semi_dual(gates_GUE, capacity, self.sparse_gamma, self.sparse_iters)
        return gates_GUE + alpha_GU[..., None]
