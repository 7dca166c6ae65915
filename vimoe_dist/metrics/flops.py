"""Peak dense FLOP/s of common accelerators, looked up by the name torch reports, and model-FLOPs utilisation.

MFU = achieved model FLOP/s / the device's peak for the training precision (PaLM, Chowdhery et al. 2022, appendix B;
the model FLOPs come from `vimoe_dist.model.flops`). The peaks are the vendors' datasheet figures for **dense** math:
NVIDIA's datasheets print tensor-core figures "with sparsity" (2:4 structured sparsity, which training does not
use) and say the dense ones are half of that; the halves are what is listed here. fp16 on V100 and T4 is their
tensor-core mixed-precision figure; "fp32" is the non-tensor FP32 rate (torch computes fp32 matmuls without TF32
unless `torch.backends.cuda.matmul.allow_tf32` is set: then "tf32" is the right peak).

Nothing here imports torch at import time (the metrics package stays light); `cuda_device_name` imports it when
called. A GPU not in the table, or a precision it lacks, is a one-line `UserError` asking for the peak explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vimoe_dist.errors import UserError

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
TERA = 1e12


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak TFLOP/s per precision (None: the device has no such math) and where the figures come from."""

    name: str
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float
    source: str

    def tflops(self, precision: str) -> float | None:
        return getattr(self, precision)


# the vendor documents behind the figures ("with sparsity" figures are halved to the dense ones)
SOURCES = {
    "gb200": "NVIDIA GB200 NVL72 datasheet, per GPU: 5 PF BF16/FP16, 2.5 PF TF32 with sparsity; 80 TF FP32",
    "b200": "NVIDIA HGX B200 datasheet, per GPU: 4.5 PF BF16/FP16, 2.2 PF TF32 with sparsity; 75 TF FP32",
    "gh200": "NVIDIA GH200 Grace Hopper Superchip datasheet: the H100/H200 SXM GPU figures",
    "h200": "NVIDIA H200 datasheet: SXM 1,979 BF16/FP16, 989 TF32; NVL 1,671, 835 (with sparsity); FP32 67 / 60",
    "h100": "NVIDIA H100 datasheet: SXM 1,979 / PCIe 1,513 / NVL 1,671 BF16/FP16 and 989 / 756 / 835 TF32 with "
    "sparsity; FP32 67 / 51 / 60",
    "a100": "NVIDIA A100 datasheet: 312 BF16/FP16, 156 TF32, 19.5 FP32 (40 and 80 GB, SXM4 and PCIe alike)",
    "l40s": "NVIDIA L40S datasheet (dense figures)",
    "l40": "NVIDIA L40 datasheet (dense figures)",
    "l4": "NVIDIA L4 datasheet: 242 BF16/FP16, 120 TF32 with sparsity; 30.3 FP32",
    "a10": "NVIDIA A10 datasheet (dense figures)",
    "a10g": "NVIDIA A10 datasheet: the A10G is AWS variant, no datasheet of its own (override if known)",
    "a40": "NVIDIA A40 datasheet (dense figures)",
    "a30": "NVIDIA A30 datasheet (dense figures)",
    "v100": "NVIDIA V100 datasheet: tensor (mixed precision) 125 SXM2, 112 PCIe, 130 V100S; FP32 15.7 / 14 / 16.4",
    "t4": "NVIDIA T4 datasheet: mixed-precision FP16/FP32 65, FP32 8.1",
    "ada": "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate, dense",
    "ga102": "NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16/BF16 tensor with FP32 accumulate, dense",
    "mi300x": "AMD Instinct MI300X datasheet (dense; FP32 matrix)",
    "mi250x": "AMD Instinct MI250X datasheet: 383 BF16/FP16, 95.7 FP32 matrix per two-GCD module; torch sees a GCD",
}

# pattern searched in torch.cuda.get_device_name() (case-insensitive; the first match wins, so variants come first)
_ROWS = (
    # pattern             name                bf16     fp16     tf32    fp32   source
    (r"GB200",            "GB200",            2500,    2500,    1250,   80,    "gb200"),
    (r"B200",             "B200",             2250,    2250,    1100,   75,    "b200"),
    (r"GH200",            "GH200",            989.5,   989.5,   494.5,  67,    "gh200"),
    (r"H200.*NVL",        "H200 NVL",         835.5,   835.5,   417.5,  60,    "h200"),
    (r"H200",             "H200 SXM",         989.5,   989.5,   494.5,  67,    "h200"),
    (r"H100.*NVL",        "H100 NVL",         835.5,   835.5,   417.5,  60,    "h100"),
    (r"H100.*PCIe",       "H100 PCIe",        756.5,   756.5,   378,    51,    "h100"),
    (r"H100",             "H100 SXM",         989.5,   989.5,   494.5,  67,    "h100"),  # "NVIDIA H100 80GB HBM3"
    (r"A100",             "A100",             312,     312,     156,    19.5,  "a100"),
    (r"L40S",             "L40S",             362.05,  362.05,  183,    91.6,  "l40s"),
    (r"L40\b",            "L40",              181.05,  181.05,  90.5,   90.5,  "l40"),
    (r"\bL4\b",           "L4",               121,     121,     60,     30.3,  "l4"),
    (r"A10G",             "A10G",             125,     125,     62.5,   31.2,  "a10g"),
    (r"\bA10\b",          "A10",              125,     125,     62.5,   31.2,  "a10"),
    (r"\bA40\b",          "A40",              149.7,   149.7,   74.8,   37.4,  "a40"),
    (r"\bA30\b",          "A30",              165,     165,     82,     10.3,  "a30"),
    (r"V100S",            "V100S PCIe",       None,    130,     None,   16.4,  "v100"),
    (r"V100.*PCIE",       "V100 PCIe",        None,    112,     None,   14,    "v100"),
    (r"V100",             "V100 SXM2",        None,    125,     None,   15.7,  "v100"),
    (r"\bT4\b",           "T4",               None,    65,      None,   8.1,   "t4"),
    (r"RTX 4090",         "RTX 4090",         165.2,   165.2,   82.6,   82.6,  "ada"),
    (r"RTX 3090(?! Ti)",  "RTX 3090",         71,      71,      35.6,   35.6,  "ga102"),
    (r"MI300X",           "MI300X",           1307.4,  1307.4,  653.7,  163.4, "mi300x"),
    (r"MI250X",           "MI250X (one GCD)", 191.5,   191.5,   None,   47.9,  "mi250x"),
)  # fmt: skip
PEAKS: tuple[tuple[str, DevicePeak], ...] = tuple(
    (pattern, DevicePeak(name, bf16, fp16, tf32, fp32, SOURCES[src]))
    for pattern, name, bf16, fp16, tf32, fp32, src in _ROWS
)


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The table's entry for a device name as torch reports it (e.g. "NVIDIA H100 80GB HBM3"), or None. A MIG
    slice ("NVIDIA A100-SXM4-40GB MIG 3g.20gb") has a fraction of its GPU's peak: None, so it must be given."""
    if re.search(r"\bMIG\b", device_name):
        return None
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops(device_name: str, precision: str, override_tflops: float | None = None, hint: str = "") -> float:
    """Peak dense FLOP/s of `device_name` at `precision` (bf16, fp16, tf32, fp32); an override (TFLOP/s) wins.

    Raises:
        UserError: an unknown device or a precision it lacks, without an override (`hint` says how to give one).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if override_tflops is not None:
        if not override_tflops > 0:
            raise UserError(f"peak TFLOP/s: {override_tflops!r} is not a positive number")
        return float(override_tflops) * TERA
    how = f" ({hint})" if hint else ""
    peak = lookup_peak(device_name)
    if peak is None:
        raise UserError(
            f"no peak {precision} FLOP/s known for GPU {device_name!r}: give its dense peak explicitly{how}"
        )
    tflops = peak.tflops(precision)
    if tflops is None:
        raise UserError(f"GPU {device_name!r} ({peak.name}) has no {precision} peak in its datasheet{how}")
    return tflops * TERA


def cuda_device_name(index: int | None = None) -> str:
    """torch.cuda.get_device_name of the current (or given) device."""
    import torch

    return torch.cuda.get_device_name(index)


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model-FLOPs utilisation: achieved model FLOP/s over the device's peak, as a ratio in [0, 1] (more than 1
    means the FLOP count or the peak is wrong)."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_s!r}")
    return achieved_flops_per_s / peak_flops_per_s
