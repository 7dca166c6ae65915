"""Reference MoE layers of other libraries behind our MoE FFN interface, for parity tests and benchmarks
(`model.moe.impl: deepspeed | fairscale`). They live outside `vimoe_dist.model` because they import those libraries."""
