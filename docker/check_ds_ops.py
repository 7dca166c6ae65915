"""Fails the image build unless DeepSpeed's ops named on the command line were compiled for CUDA.

DeepSpeed uses a precompiled op only when it was built for the accelerator it runs on (op_builder/builder.py:
`installed_ops[name] and accelerator_name == get_accelerator()._name`). A build host has no GPU, so DeepSpeed picks
its CPU accelerator unless DS_ACCELERATOR=cuda is set during `pip install`; its ops would then be JIT-compiled on
every node at the first step, or fail where the image has no compiler. This script reads what setup.py recorded.

    DS_ACCELERATOR=cuda python docker/check_ds_ops.py fused_adam async_io ...
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cuda")  # no GPU at build time: do not let deepspeed fall back to its CPU one


def problems(wanted: list[str]) -> list[str]:
    import torch
    from deepspeed.git_version_info import accelerator_name, installed_ops, torch_info

    found = []
    if accelerator_name != "cuda":
        found.append(f"deepspeed was built for the {accelerator_name!r} accelerator, not cuda (DS_ACCELERATOR=cuda)")
    missing = [op for op in wanted if not installed_ops.get(op)]
    if missing:
        found.append(f"ops not precompiled: {', '.join(missing)}")
    if torch_info.get("cuda_version") != torch.version.cuda:
        found.append(f"ops built against CUDA {torch_info.get('cuda_version')}, torch uses {torch.version.cuda}")
    return found


if __name__ == "__main__":
    issues = problems(sys.argv[1:])
    for issue in issues:
        print(f"check_ds_ops: {issue}", file=sys.stderr)
    if not issues:
        print(f"check_ds_ops: precompiled for CUDA: {', '.join(sys.argv[1:])}")
    sys.exit(1 if issues else 0)
