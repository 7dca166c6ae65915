"""The expert bank's two paths (grouped GEMM and the per-expert loop) compute the same function and gradients."""

from __future__ import annotations

import pytest
import torch

from vimoe_dist.model.moe.experts import GroupedExperts, grouped_mm_available


def _run(bank: GroupedExperts, x: torch.Tensor, counts, grad: torch.Tensor, grouped: bool):
    bank.grouped_mm = grouped
    bank.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = bank(x, counts)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in bank.named_parameters()}


@pytest.mark.parametrize("counts", [[5, 0, 9, 6], [0, 0, 20, 0], [1, 1, 1, 17]])
def test_grouped_gemm_path_matches_the_per_expert_loop(counts):
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    torch.manual_seed(0)
    bank = GroupedExperts(4, 32, 64)
    torch.nn.init.normal_(bank.fc1_bias)  # non-zero biases: each expert's own bias must reach its rows
    torch.nn.init.normal_(bank.fc2_bias)
    x, grad = torch.randn(20, 32), torch.randn(20, 32)
    y_loop, gx_loop, gp_loop = _run(bank, x, torch.tensor(counts), grad, grouped=False)
    y_grp, gx_grp, gp_grp = _run(bank, x, torch.tensor(counts), grad, grouped=True)
    torch.testing.assert_close(y_grp, y_loop)
    torch.testing.assert_close(gx_grp, gx_loop)
    for name in gp_loop:
        torch.testing.assert_close(gp_grp[name], gp_loop[name], msg=name)
    # an expert without rows gets a zero gradient on both paths (expert parallelism all-reduces every expert)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(gp_grp["fc1_weight"][e]) == 0


def test_the_loop_is_the_cpu_path():
    assert not grouped_mm_available(torch.zeros(2, 2))
    assert not grouped_mm_available(torch.zeros(2, 2, dtype=torch.bfloat16))
