"""The efficiency figures of the log record: model FLOPs per image, achieved FLOP/s, model-FLOPs utilisation (MFU),
tokens per second and GPU memory.

Model FLOPs (PaLM's MFU, Chowdhery et al. 2022, appendix B; counted by `vimoe_dist.model.flops`): the part that does
not depend on the routing (patch embedding, attention, dense FFNs, shared experts, routers, head) is counted once
per image, and the routed experts at the rows they really computed in every training forward, every micro-batch of
a gradient accumulation included (a forward hook on each MoE layer adds its `last_stats["tokens"]`, on the device,
with no host sync). Training counts three forwards (`TRAIN_FLOPS_PER_FORWARD`). Under expert parallelism a rank's
rows are those of its own images, wherever their experts ran, and the figures of a log record are the mean over
ranks (one value joins the loss in the record's all-reduce), so they are per device.

MFU = achieved FLOP/s per device / the device's dense peak at the training precision: `metrics.peak_tflops` when
set, else the datasheet table of `vimoe_dist.metrics.flops` for the GPU torch reports. A GPU the table does not know
is one warning at start-up and MFU is left out; on the CPU there is nothing to look up, so MFU is written only
against a configured peak (the FLOP figures are written either way). Counting FLOPs never stops training: a model
the counter does not handle is one warning and the FLOP figures are left out.

GPU memory (torch's caching allocator, this rank's device): allocated and reserved bytes at the log, and the peak
allocated since the previous log (the peak is reset at each log, so the curve shows where memory peaks: the
maximum of the curve is the run's peak). Absent on the CPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vimoe_dist.config import Config
from vimoe_dist.errors import UserError
from vimoe_dist.metrics.base import one_line
from vimoe_dist.metrics.flops import TERA, peak_flops
from vimoe_dist.model.flops import TRAIN_FLOPS_PER_FORWARD, expert_flops, model_flops, tokens_per_image

log = logging.getLogger("vimoe.train")

PEAK_HINT = "metrics.peak_tflops=TFLOPS"


class Efficiency:
    """FLOP accounting between two log records, the device's peak and the GPU memory figures.

    Args:
        cfg: the run config (`parallel.precision`, `metrics.peak_tflops`).
        model: the parallelized model (not the engine).
        layers: block index -> MoE FFN of `model` (`vimoe_dist.model.moe_layers`).
        device: this rank's device.
        is_main: whether this is rank 0, which logs the start-up warnings (one line per job).
    """

    def __init__(self, cfg: Config, model: nn.Module, layers: dict[int, nn.Module], device: torch.device,
                 is_main: bool = True) -> None:  # fmt: skip
        self.device = device
        self.images = 0  # images of the training forwards since the last take, this rank
        self.expert_flops = torch.zeros((), dtype=torch.float64, device=device)  # their routed experts' forward FLOPs
        self.fixed_flops: float | None = None  # forward FLOPs per image outside the routed experts
        self.tokens_per_image: int | None = None
        self.peak_flops: float | None = None  # FLOP/s of one device at the training precision; None: no MFU
        try:
            self.tokens_per_image = tokens_per_image(model)
            self.fixed_flops = model_flops(model).fixed
            row_flops = {i: expert_flops(model, {i: [1]}) for i in layers}
        except Exception as e:  # a backbone or layer the counter does not handle: tracking never stops training
            self.fixed_flops = None
            if is_main:
                log.warning("metrics: model FLOPs cannot be counted (%s); flops_per_image, achieved_tflops and mfu "
                            "are left out", one_line(e))  # fmt: skip
            return
        model.register_forward_hook(self._count_images)
        for i, layer in layers.items():
            layer.register_forward_hook(self._count_rows(row_flops[i]))
        self.peak_flops = device_peak(cfg, device, is_main)

    def _count_images(self, module: nn.Module, args: tuple, output) -> None:
        if module.training and args and torch.is_tensor(args[0]):
            self.images += args[0].shape[0]

    def _count_rows(self, row_flops: float):
        def hook(module: nn.Module, args: tuple, output) -> None:
            tokens = module.last_stats.get("tokens") if module.training else None
            if tokens is not None:
                self.expert_flops.add_(tokens.sum().to(torch.float64), alpha=row_flops)

        return hook

    def take_expert_flops(self) -> torch.Tensor:
        """The routed experts' forward FLOPs since the last call (a device scalar, float64), reset to zero: the
        caller all-reduces its mean over ranks with the loss."""
        out = self.expert_flops.clone()
        self.expert_flops.zero_()
        return out

    def record(self, seconds: float, expert_flops: float, images_per_sec: float) -> dict[str, float]:
        """The figures of a log record: `seconds` of training steps since the last one, in which this rank's
        training forwards saw `self.images` images whose routed experts cost `expert_flops` forward FLOPs (the
        mean over ranks); `images_per_sec` over all ranks. Resets the image count."""
        images, self.images = self.images, 0
        out: dict[str, float] = {}
        if self.tokens_per_image is not None:
            out["tokens_per_sec"] = images_per_sec * self.tokens_per_image
        if self.fixed_flops is not None and images > 0 and seconds > 0:
            training = TRAIN_FLOPS_PER_FORWARD * (self.fixed_flops * images + expert_flops)
            out["flops_per_image"] = training / images
            out["achieved_tflops"] = training / seconds / TERA
            if self.peak_flops is not None:
                out["mfu"] = training / seconds / self.peak_flops
        out.update(gpu_memory(self.device))
        return out


def device_peak(cfg: Config, device: torch.device, is_main: bool = True) -> float | None:
    """Dense peak FLOP/s of `device` at the training precision: `metrics.peak_tflops` when set, else the table's
    figure for the GPU; None (no MFU) on the CPU without a configured peak, and for a GPU the table does not know
    (one warning on rank 0)."""
    override = cfg.metrics.peak_tflops
    if device.type != "cuda":
        return override * TERA if override is not None else None
    name = torch.cuda.get_device_name(device)
    try:
        return peak_flops(name, matmul_precision(cfg.parallel.precision), override, hint=PEAK_HINT)
    except UserError as e:
        if is_main:
            log.warning("metrics: MFU is left out: %s", e)
        return None


def matmul_precision(precision: str) -> str:
    """The peak table's precision for `parallel.precision`: fp32 matmuls run on TF32 tensor cores when torch allows
    it (`torch.backends.cuda.matmul.allow_tf32`, or a float32 matmul precision other than "highest")."""
    if precision != "fp32":
        return precision
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def gpu_memory(device: torch.device) -> dict[str, int]:
    """This rank's GPU memory: allocated and reserved bytes now, and the peak allocated since the previous call
    (which resets it); empty on the CPU."""
    if device.type != "cuda":
        return {}
    out = {
        "gpu_allocated_bytes": torch.cuda.memory_allocated(device),
        "gpu_reserved_bytes": torch.cuda.memory_reserved(device),
        "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out
