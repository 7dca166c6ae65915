"""Auxiliary router losses against values derived by hand from their papers' formulas (G groups, U units, E experts).

V-MoE (Riquelme et al. 2021, App. A): importance on the noise-free softmax; load with threshold = the unit's k-th
largest noisy logit, p_e = Phi(((W x)_e - threshold) / sigma). Switch (Fedus et al. 2022, eq. 4): E sum_e f_e P_e.
ST-MoE z-loss (Zoph et al. 2022, eq. 5): mean over units of logsumexp^2.
"""

from __future__ import annotations

import math

import pytest
import torch

from vimoe_dist.model.moe import losses
from vimoe_dist.model.moe.routers import build_router
from vimoe_dist.model.moe.routers.common import AuxLossWeights, add_gate_noise

# one group, two units, two experts: logits (ln 9, 0) and (0, 0) have softmax gates (0.9, 0.1) and (0.5, 0.5)
LOGITS_9 = torch.tensor([[[math.log(9.0), 0.0], [0.0, 0.0]]])
PROBS = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])

# Standard normal CDF from the table: Phi(-0.5) = 0.30854, Phi(-1.5) = 0.06681, Phi(-1) = 0.15866, Phi(-3) = 0.00135,
# Phi(0.7) = 0.75804, Phi(-0.3) = 0.38209, Phi(-1.3) = 0.09680, Phi(1.5) = 0.93319, Phi(0.5) = 0.69146.
# For two experts CV^2 = ((p0 - p1) / (p0 + p1))^2.


def test_importance_loss_is_on_the_noise_free_softmax() -> None:
    # gates (0.9, 0.1), (0.5, 0.5): summed per expert (1.4, 0.6), mean 1, variance (0.4^2 + 0.4^2) / 2 = 0.16, CV^2 0.16
    assert losses.importance_loss(LOGITS_9).item() == pytest.approx(0.16)
    # a second, perfectly balanced group (CV^2 = 0) halves the average over groups
    assert losses.importance_loss(torch.cat([LOGITS_9, torch.zeros(1, 2, 2)])).item() == pytest.approx(0.08)


def test_load_loss_top1() -> None:
    # logits (1, 0), noisy (1.5, 0.2), sigma 1, k = 1: threshold = the largest noisy logit 1.5 for every expert;
    # p = (Phi(1 - 1.5), Phi(0 - 1.5)) = (0.30854, 0.06681); CV^2 = (0.24173 / 0.37535)^2 = 0.41475.
    # (Shazeer's form would compare e0 with the 2nd value 0.2 instead: Phi(0.8) = 0.78814 and CV^2 0.71185.)
    logits, noisy = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.5, 0.2]]])
    assert losses.load_loss(logits, noisy, top_k=1, sigma=1.0).item() == pytest.approx(0.41475, rel=1e-4)
    # sigma 0.5: p = (Phi(-1), Phi(-3)) = (0.15866, 0.00135); CV^2 = (0.15731 / 0.16001)^2 = 0.96654
    assert losses.load_loss(logits, noisy, top_k=1, sigma=0.5).item() == pytest.approx(0.96654, rel=1e-3)


def test_load_loss_top2_and_top_e() -> None:
    # logits (1, 0, -1), noisy (1.2, 0.3, -0.5), k = 2: threshold = the 2nd largest noisy logit 0.3;
    # p = (Phi(0.7), Phi(-0.3), Phi(-1.3)) = (0.75804, 0.38209, 0.09680): mean 0.41231, mean of squares 0.24333,
    # variance 0.07333, CV^2 = 0.07333 / 0.41231^2 = 0.43135
    logits, noisy = torch.tensor([[[1.0, 0.0, -1.0]]]), torch.tensor([[[1.2, 0.3, -0.5]]])
    assert losses.load_loss(logits, noisy, top_k=2, sigma=1.0).item() == pytest.approx(0.43135, rel=1e-3)
    # k = E = 3: threshold = the smallest noisy logit -0.5; p = (Phi(1.5), Phi(0.5), Phi(-0.5)) = (0.93319, 0.69146,
    # 0.30854): mean 0.64440, variance 0.06614, CV^2 0.15928 (the loss is defined; vmoe does not special-case k = E)
    assert losses.load_loss(logits, noisy, top_k=3, sigma=1.0).item() == pytest.approx(0.15928, rel=1e-3)


def test_load_loss_gradient_flows_through_the_threshold() -> None:
    # The threshold is itself a noisy logit (noisy = logits + eps), so adding a constant to every logit shifts the
    # threshold with them and leaves every p_e unchanged: the gradient of the loss sums to zero over the experts.
    # A threshold cut off from the gradient would leave e1's pull on its own logit unbalanced.
    logits = torch.tensor([[[1.0, 0.0, -1.0]]], requires_grad=True)
    eps = torch.tensor([[[0.2, 0.3, 0.5]]])
    losses.load_loss(logits, logits + eps, top_k=1, sigma=1.0).backward()
    assert logits.grad.abs().sum() > 0
    assert logits.grad.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_switch_loss() -> None:
    # both units' first choice e0: f = (1, 0); mean gates P = (0.7, 0.3); E * sum f P = 2 * 0.7 = 1.4
    assert losses.switch_loss(PROBS, torch.tensor([[0, 0]])).item() == pytest.approx(1.4)
    # first choices e0, e1: f = (0.5, 0.5), 2 * (0.5 * 0.7 + 0.5 * 0.3) = 1, the value of perfect balance
    assert losses.switch_loss(PROBS, torch.tensor([[0, 1]])).item() == pytest.approx(1.0)


def test_z_loss() -> None:
    # log-partitions ln(1 + 1) = ln 2 and ln(3 + 1) = 2 ln 2: mean of squares = (1 + 4) / 2 (ln 2)^2
    assert losses.z_loss(LOGITS).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_weighted_sum_of_configured_losses() -> None:
    # 0.5 * importance (0.16) + 0.1 * switch (1.4, first choices e0, e0) + 0.01 * z; no noise: no load loss
    aux = AuxLossWeights(importance_loss=0.5, load_loss=1.0, switch_loss=0.1, z_loss=0.01)
    z = (math.log(10.0) ** 2 + math.log(2.0) ** 2) / 2  # logsumexp of (ln 9, 0) is ln 10, of (0, 0) ln 2
    assert aux(LOGITS_9, PROBS, torch.tensor([[0, 0]])).item() == pytest.approx(0.08 + 0.14 + 0.01 * z)
    assert AuxLossWeights()(LOGITS_9, PROBS).item() == 0.0
    # with noise the load term joins: logits (1, 0), noisy (1.5, 0.2), relative noise 2 over E = 2 experts: sigma 1
    load = AuxLossWeights(load_loss=2.0)
    total = load(torch.tensor([[[1.0, 0.0]]]), PROBS[:, :1], None, torch.tensor([[[1.5, 0.2]]]), 1, noise_std=2.0)
    assert total.item() == pytest.approx(2 * 0.41475, rel=1e-4)


@pytest.mark.parametrize("value", [-0.01, float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["importance_loss", "load_loss", "switch_loss", "z_loss"])
def test_bad_loss_weights_name_the_option(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        AuxLossWeights(**{name: value})


def test_gate_noise_is_relative_to_one_over_e() -> None:
    # V-MoE: eps ~ N(0, (noise_std / E)^2); noise_std 2 over E = 8 experts: std 0.25; none in evaluation
    torch.manual_seed(0)
    logits = torch.zeros(1, 200_000, 8)
    assert add_gate_noise(logits, 2.0, training=True).std().item() == pytest.approx(0.25, rel=0.01)
    assert add_gate_noise(logits, 2.0, training=False) is logits


@pytest.mark.parametrize("name", ["tc-softmax", "ec-softmax"])
def test_router_importance_ignores_the_noise(name: str) -> None:
    # units e_0, e_1 with gate columns (ln 9, 0) and (0, 0): whatever noise is drawn while training, the importance
    # loss is that of the noise-free gates (0.9, 0.1), (0.5, 0.5): 0.16
    router = build_router(name, 2, 2, importance_loss=1.0, noise_std=50.0).train()
    with torch.no_grad():
        router.gate.weight.copy_(LOGITS_9[0].T)
    torch.manual_seed(0)
    assert router(torch.eye(2)).aux_loss.item() == pytest.approx(0.16, rel=1e-5)


@pytest.mark.parametrize("name", ["tc-softmax", "tc-sinkhorn", "ec-softmax", "ec-sinkhorn", "ec-sparse", "soft"])
def test_noise_std_must_not_be_negative(name: str) -> None:
    with pytest.raises(ValueError, match="noise_std"):
        build_router(name, 4, 2, noise_std=-0.1, **({"slots_per_expert": 1} if name == "soft" else {}))
