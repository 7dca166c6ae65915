"""Auxiliary router losses against values derived by hand (G groups, U units, E experts)."""

from __future__ import annotations

import math

import pytest
import torch

from vimoe_dist.model.moe import losses
from vimoe_dist.model.moe.routers.common import AuxLossWeights

# one group, two units, two experts
PROBS = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])


def test_importance_loss() -> None:
    # summed gates per expert (1.4, 0.6): mean 1, variance ((0.4)^2 + (0.4)^2) / 2 = 0.16, CV^2 = 0.16
    assert losses.importance_loss(PROBS).item() == pytest.approx(0.16)
    # a second, perfectly balanced group (CV^2 = 0) halves the average over groups
    balanced = torch.full((1, 2, 2), 0.5)
    assert losses.importance_loss(torch.cat([PROBS, balanced])).item() == pytest.approx(0.08)


def test_switch_loss() -> None:
    # both units' first choice e0: f = (1, 0); mean gates P = (0.7, 0.3); E * sum f P = 2 * 0.7 = 1.4
    assert losses.switch_loss(PROBS, torch.tensor([[0, 0]])).item() == pytest.approx(1.4)
    # first choices e0, e1: f = (0.5, 0.5), 2 * (0.5 * 0.7 + 0.5 * 0.3) = 1, the value of perfect balance
    assert losses.switch_loss(PROBS, torch.tensor([[0, 1]])).item() == pytest.approx(1.0)


def test_z_loss() -> None:
    # log-partitions ln(1 + 1) = ln 2 and ln(3 + 1) = 2 ln 2: mean of squares = (1 + 4) / 2 (ln 2)^2
    assert losses.z_loss(LOGITS).item() == pytest.approx(2.5 * math.log(2) ** 2)


# Standard normal CDF from the table: Phi(0.8) = 0.78814, Phi(-1.5) = 0.06681, Phi(1.5) = 0.93319,
# Phi(0.5) = 0.69146, Phi(-1.3) = 0.09680.
def test_load_loss_top1() -> None:
    # one unit, logits (1, 0), noisy (1.5, 0.2), noise std 1, k=1. e0 is in the top-1: it stays there if its own
    # noisy logit beats the 2nd value 0.2, p0 = Phi(1 - 0.2) = 0.78814; e1 must beat the 1st, p1 = Phi(0 - 1.5) =
    # 0.06681. With E = 2, CV^2 = ((p0 - p1) / (p0 + p1))^2 = (0.72133 / 0.85495)^2 = 0.71185.
    loss = losses.load_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.5, 0.2]]]), top_k=1, noise_std=1.0)
    assert loss.item() == pytest.approx(0.71185, rel=1e-4)


def test_load_loss_top2() -> None:
    # logits (1, 0, -1), noisy (1.2, 0.3, -0.5), k=2: e0, e1 are in the top-2 and must beat the 3rd value -0.5,
    # e2 must beat the 2nd, 0.3: p = (Phi(1.5), Phi(0.5), Phi(-1.3)) = (0.93319, 0.69146, 0.09680);
    # mean 0.573817, mean of squares 0.452777, variance 0.123511, CV^2 = 0.123511 / 0.573817^2 = 0.37511
    logits, noisy = torch.tensor([[[1.0, 0.0, -1.0]]]), torch.tensor([[[1.2, 0.3, -0.5]]])
    assert losses.load_loss(logits, noisy, top_k=2, noise_std=1.0).item() == pytest.approx(0.37511, rel=1e-3)
    # k = E: every expert is always chosen, the load is flat
    assert losses.load_loss(logits, noisy, top_k=3, noise_std=1.0).item() == 0.0


def test_weighted_sum_of_configured_losses() -> None:
    # 0.5 * importance (0.16) + 0.1 * switch (1.4, first choices e0, e0) + 0.01 * z (2.5 (ln 2)^2); no noise: no load
    aux = AuxLossWeights(importance_loss=0.5, load_loss=1.0, switch_loss=0.1, z_loss=0.01)
    total = aux(LOGITS, PROBS, torch.tensor([[0, 0]]))
    assert total.item() == pytest.approx(0.08 + 0.14 + 0.025 * math.log(2) ** 2)
    assert AuxLossWeights()(LOGITS, PROBS).item() == 0.0
