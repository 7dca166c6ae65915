"""Class x expert routing matrices, accumulated batch by batch from the MoE layers' recorded assignments.

An MoE layer with `record_routing` set leaves `last_assignment` [B, N, E]: the combine weight each token of each image
gives each expert (0 where the token was not routed there). This module turns those into per-layer statistics that
only ever add up, so that batches, and ranks, combine by summation.

Counting rule (stated in `routing.json` too): every image counts **once** per layer, top-k by weight. An image's
routing distribution is its tokens' combine weights summed per expert and normalised to sum to one; under top-2
image routing with gates 0.6 and 0.3 the image adds 2/3 to its first expert's cell and 1/3 to its second's. A token
counts once the same way at token level. An image (token) no expert took - dropped at capacity - adds to the
`dropped` column instead, so for every class: row sum + dropped = number of images (tokens). The `hits` matrix
counts top-k the other way: an image adds 1 to every expert that received any of its tokens (k times under top-k
image routing).

Shape legend:
    B: images   N: tokens per image   E: experts   C: classes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-12


@dataclass
class LayerRouting:
    """Everything the scores and heatmaps of one MoE layer need; all fields are sums over images."""

    num_classes: int
    num_experts: int
    image_weight_CE: torch.Tensor = None  # per class, sum of the images' routing distributions
    image_hits_CE: torch.Tensor = None  # per class, images that sent any token to the expert
    images_dropped_C: torch.Tensor = None  # per class, images no expert took
    images_C: torch.Tensor = None  # per class, images seen
    token_weight_CE: torch.Tensor = None  # per class, sum of the tokens' routing distributions
    tokens_dropped_C: torch.Tensor = None
    tokens_C: torch.Tensor = None
    load_E: torch.Tensor = None  # (token, expert) assignments per expert: the work each expert did
    mass_E: torch.Tensor = None  # combine weight per expert: the load-weighted average of `vimoe prune` uses it
    token_entropy_sum: torch.Tensor = None  # sum over routed tokens of the entropy of their distribution (nats)
    image_entropy_sum: torch.Tensor = None  # sum over routed images of the entropy of their distribution (nats)
    # per image, kept for the label-shuffle chance level of the specialisation score
    image_shares: list[torch.Tensor] = field(default_factory=list)  # [b, E] each, rows of routed images
    image_labels: list[torch.Tensor] = field(default_factory=list)  # [b] each

    def __post_init__(self) -> None:
        C, E = self.num_classes, self.num_experts
        z = torch.zeros
        defaults = {
            "image_weight_CE": (C, E),
            "image_hits_CE": (C, E),
            "images_dropped_C": (C,),
            "images_C": (C,),
            "token_weight_CE": (C, E),
            "tokens_dropped_C": (C,),
            "tokens_C": (C,),
            "load_E": (E,),
            "mass_E": (E,),
            "token_entropy_sum": (),
            "image_entropy_sum": (),
        }
        for name, shape in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, z(shape, dtype=torch.float64))

    SUMMED = (
        "image_weight_CE",
        "image_hits_CE",
        "images_dropped_C",
        "images_C",
        "token_weight_CE",
        "tokens_dropped_C",
        "tokens_C",
        "load_E",
        "mass_E",
        "token_entropy_sum",
        "image_entropy_sum",
    )

    @torch.no_grad()
    def update(self, assignment_BNE: torch.Tensor, labels_B: torch.Tensor) -> None:
        """Adds one batch of real images (padding already removed)."""
        w_BNE = assignment_BNE.detach().to("cpu", torch.float64).clamp_min(0)
        labels_B = labels_B.detach().to("cpu", torch.long)
        B, N, num_e = w_BNE.shape
        if num_e != self.num_experts:
            raise ValueError(f"assignment has {num_e} experts, the layer {self.num_experts}")
        if labels_B.shape != (B,):
            raise ValueError(f"labels have shape {tuple(labels_B.shape)}, expected ({B},)")
        if B and (labels_B.min() < 0 or labels_B.max() >= self.num_classes):
            raise ValueError(f"a label is outside [0, {self.num_classes}): {labels_B.tolist()}")
        one_hot_BC = torch.nn.functional.one_hot(labels_B, self.num_classes).to(torch.float64)

        token_mass_BN = w_BNE.sum(-1)
        token_routed_BN = token_mass_BN > EPS
        token_share_BNE = w_BNE / token_mass_BN.clamp_min(EPS)[..., None] * token_routed_BN[..., None]
        self.token_weight_CE += one_hot_BC.T @ token_share_BNE.sum(1)
        self.tokens_dropped_C += one_hot_BC.T @ (~token_routed_BN).sum(1).to(torch.float64)
        self.tokens_C += one_hot_BC.sum(0) * N
        self.load_E += (w_BNE > EPS).sum(dim=(0, 1)).to(torch.float64)
        self.mass_E += w_BNE.sum(dim=(0, 1))
        self.token_entropy_sum += _entropy(token_share_BNE).sum()

        image_mass_BE = w_BNE.sum(1)
        image_routed_B = image_mass_BE.sum(-1) > EPS
        image_share_BE = image_mass_BE / image_mass_BE.sum(-1, keepdim=True).clamp_min(EPS) * image_routed_B[:, None]
        self.image_weight_CE += one_hot_BC.T @ image_share_BE
        self.image_hits_CE += one_hot_BC.T @ (image_mass_BE > EPS).to(torch.float64)
        self.images_dropped_C += one_hot_BC.T @ (~image_routed_B).to(torch.float64)
        self.images_C += one_hot_BC.sum(0)
        self.image_entropy_sum += _entropy(image_share_BE).sum()
        self.image_shares.append(image_share_BE[image_routed_B].float())
        self.image_labels.append(labels_B[image_routed_B])

    def merge_(self, other: LayerRouting) -> None:
        """Adds another accumulator of the same layer (another rank's, or another shard's)."""
        for name in self.SUMMED:
            getattr(self, name).add_(getattr(other, name))
        self.image_shares.extend(other.image_shares)
        self.image_labels.extend(other.image_labels)

    def shares_and_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All routed images' distributions [n, E] and labels [n]."""
        if not self.image_shares:
            return torch.zeros(0, self.num_experts), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.image_shares), torch.cat(self.image_labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors, for `matrices.pt` (reload with `from_state_dict` to redraw or rescore)."""
        state = {name: getattr(self, name) for name in self.SUMMED}
        shares, labels = self.shares_and_labels()
        state.update(image_shares=shares, image_labels=labels)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> LayerRouting:
        C, E = state["image_weight_CE"].shape
        out = cls(C, E, **{name: state[name] for name in cls.SUMMED})
        out.image_shares, out.image_labels = [state["image_shares"]], [state["image_labels"]]
        return out


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) along the last dim of rows that are distributions (all-zero rows give 0)."""
    return -(p * p.clamp_min(EPS).log()).sum(-1)


class RoutingAccumulator:
    """One `LayerRouting` per MoE block; `update` reads every layer's `last_assignment` after a forward."""

    def __init__(self, num_classes: int, layers: dict[int, int]) -> None:
        """`layers` maps block index -> number of experts."""
        self.num_classes = num_classes
        self.layers = {i: LayerRouting(num_classes, e) for i, e in sorted(layers.items())}

    def update(
        self, assignments: dict[int, torch.Tensor], labels_B: torch.Tensor, valid_B: torch.Tensor | None
    ) -> None:
        """Adds one batch: block index -> assignment [B, N, E]; `valid_B` drops padding images (None: all real)."""
        keep = None if valid_B is None else valid_B.detach().to("cpu", torch.bool)
        labels = labels_B.detach().cpu()
        for i, layer in self.layers.items():
            a = assignments[i]
            if keep is not None:
                a, lab = a[keep.to(a.device)], labels[keep]
            else:
                lab = labels
            layer.update(a, lab)

    def all_reduce(self) -> None:
        """Sums every rank's statistics into every rank (a no-op without an initialised process group)."""
        from vimoe_dist.parallel import collectives

        if collectives.world_size() == 1:
            return
        for layer in self.layers.values():
            for name in LayerRouting.SUMMED:
                setattr(layer, name, collectives.sum_to_host(getattr(layer, name)))
            gathered = collectives.all_gather_object(layer.shares_and_labels())
            layer.image_shares = [g[0] for g in gathered]
            layer.image_labels = [g[1] for g in gathered]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {str(i): layer.state_dict() for i, layer in self.layers.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, dict[str, torch.Tensor]]) -> RoutingAccumulator:
        layers = {int(i): LayerRouting.from_state_dict(s) for i, s in state.items()}
        first = next(iter(layers.values()))
        out = cls(first.num_classes, {i: layer.num_experts for i, layer in layers.items()})
        out.layers = layers
        return out
