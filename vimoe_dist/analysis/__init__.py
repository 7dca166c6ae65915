"""Routing analysis and MoE-layer selection: the ViMoE study tools (Han et al. 2024, "ViMoE: An Empirical Study of
Designing Vision Mixture-of-Experts").

`vimoe analyze routing` accumulates class x expert matrices per MoE layer (`accumulate`), scores them (`scores`),
draws them (`heatmaps`) and recommends the layers to keep (`recommend`); `vimoe prune` turns the others back into
dense FFNs (`prune`); `vimoe study layers` runs the sweep over the number of MoE blocks (`study`).
"""
