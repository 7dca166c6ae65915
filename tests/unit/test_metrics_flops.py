"""Device peaks (vimoe_dist/metrics/flops.py): names as torch.cuda.get_device_name() reports them map to the dense
datasheet figures; unknown devices and missing precisions are one-line errors unless a peak is given. No GPU runs
here: the names are the strings those GPUs report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vimoe_dist.errors import UserError
from vimoe_dist.metrics.flops import PEAKS, PRECISIONS, SOURCES, lookup_peak, mfu, peak_flops

# device name as torch reports it -> (table entry, dense bf16 TFLOP/s)
REPORTED = {
    "NVIDIA A100-SXM4-40GB": ("A100", 312),
    "NVIDIA A100-SXM4-80GB": ("A100", 312),
    "NVIDIA A100-PCIE-40GB": ("A100", 312),
    "NVIDIA A100 80GB PCIe": ("A100", 312),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.5),
    "NVIDIA H100 PCIe": ("H100 PCIe", 756.5),
    "NVIDIA H100 NVL": ("H100 NVL", 835.5),
    "NVIDIA H200": ("H200 SXM", 989.5),
    "NVIDIA H200 NVL": ("H200 NVL", 835.5),
    "NVIDIA GH200 480GB": ("GH200", 989.5),
    "NVIDIA B200": ("B200", 2250),
    "NVIDIA GB200": ("GB200", 2500),
    "NVIDIA L40S": ("L40S", 362.05),
    "NVIDIA L40": ("L40", 181.05),
    "NVIDIA L4": ("L4", 121),
    "NVIDIA A10G": ("A10G", 125),
    "NVIDIA A10": ("A10", 125),
    "NVIDIA GeForce RTX 4090": ("RTX 4090", 165.2),
    "NVIDIA GeForce RTX 3090": ("RTX 3090", 71),
    "AMD Instinct MI300X": ("MI300X", 1307.4),
}


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_reported_names_find_their_dense_peak(name):
    entry, bf16 = REPORTED[name]
    peak = lookup_peak(name)
    assert peak is not None and peak.name == entry
    assert peak_flops(name, "bf16") == pytest.approx(bf16 * 1e12)


def test_sparse_datasheet_figures_are_halved():
    # H100 SXM's datasheet: 1,979 BF16 and 989 TF32 TFLOP/s "with sparsity"
    h100 = lookup_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bf16, h100.tf32, h100.fp32) == (1979 / 2, 989 / 2, 67)
    assert lookup_peak("NVIDIA A100-SXM4-80GB").tf32 == 156


def test_a_mig_slice_needs_its_peak_given():
    assert lookup_peak("NVIDIA A100-SXM4-40GB MIG 3g.20gb") is None
    with pytest.raises(UserError, match=r"MIG 1g\.10gb"):
        peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16")


def test_v100_has_fp16_but_no_bf16():
    assert peak_flops("Tesla V100-SXM2-32GB", "fp16") == 125e12
    assert peak_flops("Tesla V100-PCIE-16GB", "fp16") == 112e12
    assert peak_flops("Tesla V100S-PCIE-32GB", "fp16") == 130e12
    with pytest.raises(UserError) as e:
        peak_flops("Tesla V100-SXM2-32GB", "bf16", hint="--peak-tflops")
    assert str(e.value) == "GPU 'Tesla V100-SXM2-32GB' (V100 SXM2) has no bf16 peak in its datasheet (--peak-tflops)"


def test_unknown_gpu_without_override_is_one_line_and_an_override_wins():
    with pytest.raises(UserError) as e:
        peak_flops("NVIDIA Future GPU 9000", "bf16", hint="set --peak-tflops")
    msg = str(e.value)
    assert "\n" not in msg and "'NVIDIA Future GPU 9000'" in msg and "--peak-tflops" in msg
    assert peak_flops("NVIDIA Future GPU 9000", "bf16", override_tflops=400) == 400e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", override_tflops=900) == 900e12  # a measured peak wins
    with pytest.raises(UserError, match="not a positive number"):
        peak_flops("NVIDIA H100 80GB HBM3", "bf16", override_tflops=0)
    with pytest.raises(UserError, match="not one of bf16, fp16, tf32, fp32"):
        peak_flops("NVIDIA H100 80GB HBM3", "fp8")


def test_table_is_consistent():
    assert PRECISIONS == ("bf16", "fp16", "tf32", "fp32")
    for _, peak in PEAKS:
        assert peak.source in SOURCES.values()
        assert peak.fp32 > 0
        if peak.bf16 is not None:
            assert peak.bf16 >= peak.fp32 and (peak.tf32 is None or peak.bf16 >= peak.tf32)


def test_mfu():
    assert mfu(400e12, 989.5e12) == pytest.approx(0.4042, abs=1e-4)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)


def test_importing_it_does_not_import_torch():
    code = "import sys, vimoe_dist.metrics.flops; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
