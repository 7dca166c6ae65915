"""Reference MoE layers of other libraries behind our MoE FFN interface, for the parity tests and `vimoe bench moe`.

They are layer factories (`dim, hidden_dim, moe_cfg -> module`, like `vimoe_dist.model.build_moe`): a benchmark or a
test passes one to `build_moe`'s callers in place of ours (timm's `mlp_layer` idea), so the model package never
imports them. They live under `parallel/` because they import DeepSpeed and fairscale; the trainer never builds one.
"""
