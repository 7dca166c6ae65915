"""Routing matrices, specialisation scores, the keep/redundant recommendation and the heatmaps, on assignments built
by hand: a planted pattern where the class decides the expert, random routing, a collapsed router."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from vimoe_dist.analysis.accumulate import LayerRouting, RoutingAccumulator
from vimoe_dist.analysis.heatmaps import bin_rows, order_classes, plot_layer, plot_overview
from vimoe_dist.analysis.recommend import recommend
from vimoe_dist.analysis.scores import layer_scores, normalized_mutual_information

C, E, N, B = 10, 4, 6, 600


def _labels(seed: int = 0, num: int = B, classes: int = C) -> torch.Tensor:
    return torch.randint(0, classes, (num,), generator=torch.Generator().manual_seed(seed))


def planted_image_top2(labels: torch.Tensor, num_tokens: int = N) -> torch.Tensor:
    """Image routing where the class picks both experts: gates 0.6 on class % E, 0.3 on the next one."""
    a = torch.zeros(labels.numel(), num_tokens, E)
    rows = torch.arange(labels.numel())
    a[rows, :, labels % E] = 0.6
    a[rows, :, (labels + 1) % E] = 0.3
    return a


def random_image_top1(num: int, seed: int = 1) -> torch.Tensor:
    a = torch.zeros(num, N, E)
    a[torch.arange(num), :, torch.randint(0, E, (num,), generator=torch.Generator().manual_seed(seed))] = 1.0
    return a


def random_token_top1(num: int, num_tokens: int = 64, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.zeros(num, num_tokens, E).scatter_(2, torch.randint(0, E, (num, num_tokens, 1), generator=gen), 1.0)


def _layer(a: torch.Tensor, labels: torch.Tensor, classes: int = C) -> LayerRouting:
    layer = LayerRouting(classes, a.shape[-1])
    layer.update(a, labels)
    return layer


def test_matrices_count_every_image_and_token_once_with_drops() -> None:
    labels = _labels()
    a = planted_image_top2(labels)
    gen = torch.Generator().manual_seed(3)
    dropped_images = torch.rand(B, generator=gen) < 0.1
    a[dropped_images] = 0  # capacity overflow: the whole image reaches no expert
    dropped_tokens = torch.rand(B, N, generator=gen) < 0.05
    a[dropped_tokens] = 0
    second_lost = torch.rand(B, generator=gen) < 0.2
    a[second_lost, :, :] = torch.where(a[second_lost] == 0.3, 0.0, a[second_lost])  # only the second choice dropped
    layer = _layer(a, labels)
    per_class = torch.bincount(labels, minlength=C).double()
    assert torch.equal(layer.images_C, per_class)
    torch.testing.assert_close(layer.image_weight_CE.sum(1) + layer.images_dropped_C, per_class)
    torch.testing.assert_close(layer.token_weight_CE.sum(1) + layer.tokens_dropped_C, per_class * N)
    image_dropped = (a.sum((1, 2)) == 0).double()
    assert layer.images_dropped_C.sum() == image_dropped.sum()
    assert layer.tokens_dropped_C.sum() == (a.sum(-1) == 0).sum()
    # hits count top-k k times: 2 per routed image, 1 where the second choice was lost everywhere
    hits_per_image = (a.sum(1) > 0).sum(-1).double()
    assert layer.image_hits_CE.sum() == hits_per_image.sum()
    assert layer.load_E.sum() == (a > 0).sum()


def test_weighted_image_share_by_hand() -> None:
    # one image of class 1, two tokens: gates (0.6, 0.3) on experts (0, 2) -> shares 2/3, 1/3
    a = torch.tensor([[[0.6, 0.0, 0.3, 0.0], [0.6, 0.0, 0.3, 0.0]]])
    layer = _layer(a, torch.tensor([1]), classes=3)
    torch.testing.assert_close(layer.image_weight_CE[1], torch.tensor([2 / 3, 0, 1 / 3, 0], dtype=torch.float64))
    torch.testing.assert_close(layer.image_hits_CE[1], torch.tensor([1.0, 0, 1, 0], dtype=torch.float64))
    torch.testing.assert_close(layer.mass_E, torch.tensor([1.2, 0, 0.6, 0], dtype=torch.float64))
    assert layer.images_C.tolist() == [0, 1, 0]


def test_scores_by_hand_two_classes_two_experts() -> None:
    # class 0 always on expert 0, class 1 always on expert 1, 5 images each: I = H(C) = H(E) = log 2
    labels = torch.tensor([0] * 5 + [1] * 5)
    a = torch.zeros(10, 3, 2)
    a[labels == 0, :, 0] = 1.0
    a[labels == 1, :, 1] = 1.0
    s = layer_scores(_layer(a, labels, classes=2))
    assert s["nmi"] == pytest.approx(1.0)
    assert s["specialisation"] == pytest.approx(1.0)
    assert s["image_dependence"] == pytest.approx(1.0)
    assert s["purity"] == pytest.approx(1.0)
    assert s["load_cv"] == pytest.approx(0.0)
    assert s["routing_degree"] == pytest.approx(1.0)
    assert s["routing_entropy"]["experts"] == pytest.approx(1.0)
    assert s["routing_entropy"]["given_class"] == pytest.approx(0.0)


def test_nmi_matches_scikit_learn_for_top1() -> None:
    labels = _labels(seed=5)
    noisy = labels % E
    flip = torch.rand(B, generator=torch.Generator().manual_seed(6)) < 0.3
    noisy[flip] = torch.randint(0, E, (int(flip.sum()),), generator=torch.Generator().manual_seed(7))
    joint = torch.zeros(C, E).index_put_((labels, noisy), torch.ones(B), accumulate=True)
    assert normalized_mutual_information(joint) == pytest.approx(normalized_mutual_info_score(labels, noisy), abs=1e-9)


def test_planted_specialisation_is_found_and_kept_random_is_not() -> None:
    labels = _labels()
    scores = {
        9: layer_scores(_layer(planted_image_top2(labels), labels)),
        3: layer_scores(_layer(random_image_top1(B), labels)),
        5: layer_scores(_layer(random_token_top1(B), labels)),
        7: layer_scores(_layer(torch.zeros(B, N, E).index_fill_(2, torch.tensor([2]), 1.0), labels)),  # collapsed
    }
    planted = scores[9]
    assert planted["specialisation"] > 0.95
    assert planted["specialisation_chance"] < 0.1
    assert planted["purity"] == pytest.approx(2 / 3)  # the 0.6 gate of 0.9 total
    assert planted["routing_degree"] == pytest.approx(2.0)
    for block in (3, 5, 7):
        assert scores[block]["specialisation"] < 0.1, block
        assert scores[block]["nmi"] < 0.05, block
    assert scores[7]["image_dependence"] == pytest.approx(0.0, abs=1e-9)
    assert scores[7]["load_cv"] == pytest.approx(math.sqrt(3))  # all load on one of four experts
    rec = recommend(scores)
    assert rec["keep"] == [9]
    assert rec["redundant"] == [3, 5, 7]
    assert "image_dependence" in rec["layers"][7]["reason"]
    assert rec["prune_args"] == "--keep-layers 9"
    assert rec["layers"][9]["scores"]["specialisation"] == planted["specialisation"]


def test_tiny_sample_is_not_taken_for_specialisation() -> None:
    # 2 images per class and random routing: the class "explains" a lot by chance, and the shuffle shows it
    labels = torch.arange(40) % 20
    s = layer_scores(_layer(random_image_top1(40, seed=11), labels, classes=20))
    assert s["specialisation_chance"] > 0.4
    assert recommend({0: s})["keep"] == []


def test_merge_equals_one_pass_and_valid_mask_drops_padding() -> None:
    labels = _labels(seed=8)
    a = planted_image_top2(labels)
    whole = RoutingAccumulator(C, {4: E})
    whole.update({4: a}, labels, None)
    parts = [RoutingAccumulator(C, {4: E}) for _ in range(2)]
    parts[0].update({4: a[:250]}, labels[:250], None)
    # padding rows (valid False) carry garbage that must not count
    padded = torch.cat([a[250:], torch.ones(7, N, E)])
    valid = torch.cat([torch.ones(B - 250, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)])
    parts[1].update({4: padded}, torch.cat([labels[250:], torch.zeros(7, dtype=torch.long)]), valid)
    parts[0].layers[4].merge_(parts[1].layers[4])
    for name in LayerRouting.SUMMED:
        torch.testing.assert_close(getattr(parts[0].layers[4], name), getattr(whole.layers[4], name))
    restored = RoutingAccumulator.from_state_dict(parts[0].state_dict())
    got, want = layer_scores(restored.layers[4]), layer_scores(whole.layers[4])
    assert got.pop("routing_entropy") == pytest.approx(want.pop("routing_entropy"), rel=1e-9)
    assert got == pytest.approx(want, rel=1e-9)


def test_soft_routing_dense_weights() -> None:
    labels = _labels(seed=9)
    a = torch.full((B, N, E), 0.1)
    a[torch.arange(B), :, labels % E] = 0.7  # Soft MoE: every expert has weight, the class one most
    s = layer_scores(_layer(a, labels))
    assert s["routing_degree"] == pytest.approx(E)
    assert s["dropped_tokens"] == 0
    assert s["specialisation"] > 0.95
    assert s["purity"] == pytest.approx(0.7)


def test_class_order_groups_by_expert_and_bins_many_classes() -> None:
    shares = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.0, 0.0], [0.6, 0.4], [0.3, 0.7]])
    assert order_classes(shares).tolist() == [1, 3, 0, 4, 2]
    binned, edges = bin_rows(torch.rand(1000, 8), max_rows=64)
    assert binned.shape == (len(edges), 8) and len(edges) <= 64
    assert edges[0][0] == 0 and edges[-1][1] == 1000


def test_heatmaps_are_pngs(tmp_path) -> None:
    labels = _labels(seed=10, num=3000, classes=200)
    a = torch.zeros(3000, 2, E)
    a[torch.arange(3000), :, labels % E] = 1.0
    layer = _layer(a, labels, classes=200)
    s = layer_scores(layer)
    one = plot_layer(tmp_path / "layer_11.png", 11, layer.image_weight_CE, layer.token_weight_CE, scores=s)
    overview = plot_overview(
        tmp_path / "overview.png", {10: layer.image_weight_CE, 11: layer.image_weight_CE}, {10: s, 11: s}
    )
    for path in (one, overview):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(path).ndim == 3
