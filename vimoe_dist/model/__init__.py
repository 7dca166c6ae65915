"""Single-device ViMoE: timm ViT + MoE FFNs. Imports torch and timm only - never torch.distributed, deepspeed,
webdataset or prometheus_client; parallelism is applied from outside (`vimoe_dist.parallel`)."""

from vimoe_dist.model.build import (
    aux_loss,
    build_dense,
    build_model,
    build_moe,
    load_state_dict_file,
    moe_layers,
    upcycle,
)
from vimoe_dist.model.moe.layer import MoEFFN
from vimoe_dist.model.moe.routers import build_router

__all__ = [
    "MoEFFN",
    "aux_loss",
    "build_dense",
    "build_model",
    "build_moe",
    "build_router",
    "load_state_dict_file",
    "moe_layers",
    "upcycle",
]
