"""Specialisation scores of one MoE layer, from its accumulated class x expert statistics.

ViMoE (Han et al. 2024, Sec. 4) reads routing heatmaps: in the layers that matter, images of one class go to the
same experts; in redundant ones every class spreads the same way. These scores put numbers on what the heatmaps
show, all from information theory over the joint distribution of (class, expert) that the image-level matrix holds
(each image counts once, spread over its experts by combine weight; see `accumulate`):

- `nmi`: normalised mutual information I(C;E) / mean(H(C), H(E)) (the arithmetic normalisation, as scikit-learn's
  `normalized_mutual_info_score`, to which it reduces for top-1 routing).
- `image_dependence`: I(image;E) / log E = (H(E) - H(E|image)) / log E - how much the routing depends on the image
  at all. 0 when every image is routed alike (a collapsed router, or tokens scattered evenly at random); 1 when each
  image goes to one expert and the experts are used evenly.
- `specialisation`: I(C;E) / I(image;E) - the share of the image-dependent routing that the class explains. 1 when
  the class decides an image's routing, 0 when routing is independent of the class. Top-k and Soft MoE weights need
  no special case: the spread inside one image is in H(E|image) and cancels.
- `specialisation_chance`: the same score with the labels shuffled (mean of a few shuffles): what a finite sample
  gives with no specialisation at all. Few images per class push it up.
- `purity`: mean over classes of the share of a class's routing on its most-used expert (1/E when spread evenly).
- `routing_entropy`: H(E), H(E|C), H(E|image), H(E|token), each divided by log E.
- `load_cv`: coefficient of variation (std / mean) of the (token, expert) assignments per expert; 0 = balanced.
- `dropped_tokens`, `dropped_images`: shares that no expert took (capacity); they keep only the residual and the
  shared expert.
- `routing_degree`: the experts a token reaches on average (k for top-k minus drops, E for Soft MoE), and
  `effective_experts` = exp(mean token entropy) - how many experts really share a token's output.
"""

from __future__ import annotations

import math

import torch

from vimoe_dist.analysis.accumulate import EPS, LayerRouting

NUM_SHUFFLES = 20


def entropy(p: torch.Tensor) -> float:
    """Entropy (nats) of a distribution given as non-negative weights (normalised here)."""
    p = p.to(torch.float64).flatten()
    total = p.sum()
    if total <= EPS:
        return 0.0
    p = p / total
    return float(-(p * p.clamp_min(EPS).log()).sum())


def mutual_information(joint_CE: torch.Tensor) -> float:
    """I(C;E) in nats of a joint distribution given as non-negative weights."""
    return max(0.0, entropy(joint_CE.sum(1)) + entropy(joint_CE.sum(0)) - entropy(joint_CE))


def normalized_mutual_information(joint_CE: torch.Tensor) -> float:
    """I(C;E) / ((H(C) + H(E)) / 2); 0 when either variable is constant."""
    denom = (entropy(joint_CE.sum(1)) + entropy(joint_CE.sum(0))) / 2
    return mutual_information(joint_CE) / denom if denom > EPS else 0.0


def conditional_entropy(joint_CE: torch.Tensor) -> float:
    """H(E|C) in nats."""
    return max(0.0, entropy(joint_CE) - entropy(joint_CE.sum(1)))


def row_shares(matrix_CE: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (rows without mass stay zero)."""
    m = matrix_CE.to(torch.float64)
    return m / m.sum(1, keepdim=True).clamp_min(EPS)


def purity(matrix_CE: torch.Tensor) -> float:
    """Mean over classes with any routed image of the share on the class's most-used expert."""
    m = matrix_CE.to(torch.float64)
    seen = m.sum(1) > EPS
    if not seen.any():
        return 0.0
    return float(row_shares(m)[seen].max(1).values.mean())


def specialisation(joint_CE: torch.Tensor, image_info: float) -> float:
    """I(C;E) / I(image;E), clipped to [0, 1]; 0 when routing does not depend on the image."""
    if image_info <= 1e-6:
        return 0.0
    return min(1.0, mutual_information(joint_CE) / image_info)


def shuffled_specialisation(
    shares_nE: torch.Tensor, labels_n: torch.Tensor, num_classes: int, image_info: float, seed: int = 0
) -> float:
    """Mean specialisation over `NUM_SHUFFLES` random permutations of the labels."""
    if shares_nE.shape[0] == 0 or image_info <= 1e-6:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    shares = shares_nE.to(torch.float64)
    values = []
    for _ in range(NUM_SHUFFLES):
        perm = labels_n[torch.randperm(labels_n.numel(), generator=gen)]
        joint = torch.zeros(num_classes, shares.shape[1], dtype=torch.float64).index_add_(0, perm, shares)
        values.append(specialisation(joint, image_info))
    return sum(values) / len(values)


def layer_scores(layer: LayerRouting, seed: int = 0) -> dict[str, float | dict[str, float]]:
    """All scores of one layer (see the module docstring), as plain floats for `routing.json`."""
    E = layer.num_experts
    log_e = math.log(E) if E > 1 else 1.0  # one expert: every normalised entropy is 0 anyway
    joint = layer.image_weight_CE
    routed_images = float(layer.images_C.sum() - layer.images_dropped_C.sum())
    routed_tokens = float(layer.tokens_C.sum() - layer.tokens_dropped_C.sum())
    h_e = entropy(joint.sum(0))
    h_e_given_image = float(layer.image_entropy_sum) / routed_images if routed_images else 0.0
    h_e_given_token = float(layer.token_entropy_sum) / routed_tokens if routed_tokens else 0.0
    image_info = max(0.0, h_e - h_e_given_image)
    shares, labels = layer.shares_and_labels()
    load = layer.load_E.to(torch.float64)
    total_tokens = float(layer.tokens_C.sum())
    total_images = float(layer.images_C.sum())
    return {
        "nmi": normalized_mutual_information(joint),
        "specialisation": specialisation(joint, image_info),
        "specialisation_chance": shuffled_specialisation(shares, labels, layer.num_classes, image_info, seed),
        "image_dependence": image_info / log_e,
        "purity": purity(joint),
        "purity_tokens": purity(layer.token_weight_CE),
        "routing_entropy": {
            "experts": h_e / log_e,
            "given_class": conditional_entropy(joint) / log_e,
            "given_image": h_e_given_image / log_e,
            "given_token": h_e_given_token / log_e,
        },
        "load_cv": float(load.std(unbiased=False) / load.mean()) if load.mean() > 0 else 0.0,
        "dropped_tokens": float(layer.tokens_dropped_C.sum()) / total_tokens if total_tokens else 0.0,
        "dropped_images": float(layer.images_dropped_C.sum()) / total_images if total_images else 0.0,
        "routing_degree": float(load.sum()) / total_tokens if total_tokens else 0.0,
        "effective_experts": math.exp(h_e_given_token),
        "images": total_images,
        "tokens": total_tokens,
    }


DEFINITIONS = {
    "image_matrix": (
        "share of a class's images per expert; every image counts once, its tokens' combine weights summed per expert "
        "and normalised to 1 (top-k counted by weight, not k times); rows sum to 1 minus the dropped share"
    ),
    "image_hits_matrix": "share of a class's images that sent any token to the expert (top-k counted k times)",
    "token_matrix": "share of a class's tokens per expert, each token counted once by its normalised combine weights",
    "nmi": "I(class; expert) / mean(H(class), H(expert)) over the image matrix",
    "specialisation": "I(class; expert) / I(image; expert): share of the image-dependent routing the class explains",
    "specialisation_chance": f"specialisation with shuffled labels (mean of {NUM_SHUFFLES} shuffles)",
    "image_dependence": "I(image; expert) / log E: 0 = routing ignores the image, 1 = one expert per image, all used",
    "purity": "mean over classes of the share on the class's most-used expert (image matrix; 1/E = spread evenly)",
    "purity_tokens": "the same over the token matrix",
    "routing_entropy": "H(expert), H(expert | class), H(expert | image), H(expert | token), each / log E",
    "load_cv": "std / mean over experts of the (token, expert) assignments",
    "dropped_tokens": "share of tokens no expert took (capacity overflow)",
    "dropped_images": "share of images of which no expert took any token",
    "routing_degree": "experts a token reaches on average (k for top-k less drops; E for Soft MoE)",
    "effective_experts": "exp(mean entropy of a token's combine weights): experts that really share a token",
}
