"""What a checkpoint holds, file by file and key by key: the one definition of every name and pattern, used by the
expert-parallel adapter (which serialises the expert bank one expert per key), by saving and resuming
(train/checkpoint.py), and by everything that reads a checkpoint back as one single-device model (eval, export,
analysis).

A run's `checkpoints/` directory (DeepSpeed 0.19's file names, ZeRO 0-2, no tensor or pipeline parallelism):

    step_00000020/                                    one tag per save (`tag_for`)
        mp_rank_00_model_states.pt                    dense weights under `module`, plus our client state
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per expert: global expert E of MoE layer L
        expp_rank_{R}_mp_rank_00_optim_states.pt      ZeRO 0: optimizer state of expert-parallel rank R
        [bf16_]zero_pp_rank_{D}_mp_rank_00_optim_states.pt   ZeRO 1/2: optimizer partition of data-parallel rank D
        vimoe_rank_{r:05d}.pt                         ours: rank r's data position and metric totals
        vimoe_optim/                                  ours, optional (`vimoe checkpoint reshard`): the optimizer
            dense.pt                                  state per parameter, whole: dense parameters, group settings
            layer_{L}_expert_{E}.pt                   and one file per expert, like the weights
        COMPLETE                                      ours: written after every rank finished the tag
    latest                                            ours: the newest complete tag (DeepSpeed's own is never written)

Keys. Our expert bank stacks the experts of a layer (`experts.fc1_weight` [E, H, D]); DeepSpeed finds experts by
the key pattern `<layer>.deepspeed_moe.experts.deepspeed_experts.<local id>.<param>` and writes each to its own file
under its global id (ep rank x local experts + local id), which is what lets weights load at another ep_size. The
adapter therefore names the wrapped layer `deepspeed_moe`, and the bank's state dict is split per expert on save and
stacked again on load (`split_per_expert`, `stack_per_expert`). DeepSpeed's optimizer files are per rank (above)
and do not reshard by themselves: parallel/optim_state.py reads them back per parameter, whole, which is what lets
the optimizer state load at another layout too. The model states file carries, under LAYOUT_KEY, the layout the
tag was saved at (parallel/layout.py).
"""

from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path

import torch

from vimoe_dist.errors import UserError

# --- files of a tag directory
TAG_RE = re.compile(r"^step_(\d{8})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
EXPERT_OPTIM_FILE_RE = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
ZERO_OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
COMPLETE = "COMPLETE"
LATEST = "latest"
OPTIM_DIR = "vimoe_optim"  # the layout-free optimizer state (optional)
OPTIM_DENSE = "dense.pt"
OPTIM_EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)\.pt$")
LAYOUT_KEY = "vimoe_layout"  # client-state key of the layout a tag was saved at

# --- keys: the adapter's child, the bank's per-expert prefix and the bank's parameters
WRAPPED_LAYER = "deepspeed_moe"
PER_EXPERT_KEY = "deepspeed_experts"
EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
EXPERT_KEY_RE = re.compile(rf"^(.*)\.{WRAPPED_LAYER}\.experts\.{PER_EXPERT_KEY}\.(\d+)\.(\w+)$")
# an expert bank's parameter as the optimizer sees it: this rank's experts stacked on dim 0
EXPERT_PARAM_RE = re.compile(rf"^(.*)\.{WRAPPED_LAYER}\.experts\.({'|'.join(EXPERT_PARAMS)})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def rank_state_file(rank: int) -> str:
    return f"vimoe_rank_{rank:05d}.pt"


def zero_optim_file(dp_rank: int, bf16: bool) -> str:
    """DeepSpeed's ZeRO 1/2 optimizer partition of data-parallel rank `dp_rank`."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt"


def ep_optim_file(ep_rank: int) -> str:
    """DeepSpeed's ZeRO 0 optimizer state of an MoE model, one file per expert-parallel rank."""
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def optim_expert_file(layer: int, expert: int) -> str:
    """Ours, in OPTIM_DIR: the optimizer state of global expert `expert` of MoE layer `layer`."""
    return f"layer_{layer}_expert_{expert}.pt"


def single_device_key(key: str) -> str:
    """A key of the expert-parallel model (`blocks.4.mlp.deepspeed_moe.router...`) in single-device naming."""
    return key.replace(f".{WRAPPED_LAYER}.", ".")


def split_per_expert(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of a sharded bank: fc1_weight [L, H, D] -> deepspeed_experts.<i>.fc1_weight [H, D]."""
    for name in EXPERT_PARAMS:
        stacked = state_dict.pop(prefix + name)
        for i in range(stacked.shape[0]):
            state_dict[f"{prefix}{PER_EXPERT_KEY}.{i}.{name}"] = stacked[i]


def stack_per_expert(module: torch.nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook, the inverse (DeepSpeed has already renamed global expert ids to this rank's)."""
    pattern = re.compile(rf"^{re.escape(prefix)}{PER_EXPERT_KEY}\.(\d+)\.(\w+)$")
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(prefix + PER_EXPERT_KEY)]:
        m = pattern.match(key)
        if m:
            found.setdefault(m.group(2), {})[int(m.group(1))] = state_dict.pop(key)
    for name, per_expert in found.items():
        state_dict[prefix + name] = torch.stack([per_expert[i] for i in sorted(per_expert)])


# --- reading files back

# Plain-data classes DeepSpeed pickles into ZeRO optimizer files (attributes or enum values only: unpickling them
# runs no code); allowed by name, imported only when a file needs them
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_file(path: Path, trust: bool = False, mmap: bool = False) -> dict:
    """One checkpoint file as tensors and plain data (`weights_only`): a checkpoint directory may come from anywhere
    (`vimoe eval --checkpoint`, `run.resume=DIR`), and unpickling anything else can run code. Every file our
    trainer and DeepSpeed write loads this way (with DEEPSPEED_SAFE_GLOBALS); `run.trust_checkpoint` lifts the
    restriction."""
    allowed: list = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
        except pickle.UnpicklingError as e:
            m = _GLOBAL_RE.search(str(e))
            if m and m.group(1) in DEEPSPEED_SAFE_GLOBALS and len(allowed) < len(DEEPSPEED_SAFE_GLOBALS):
                module, _, name = m.group(1).rpartition(".")
                allowed.append(getattr(importlib.import_module(module), name))
                continue
            what = f"it needs {m.group(1)}" if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(
                f"checkpoint file {str(path)!r} holds more than tensors and plain data ({what}); "
                "if you trust it, pass run.trust_checkpoint=true"
            ) from None
        except (OSError, RuntimeError, EOFError) as e:
            raise UserError(f"checkpoint file {str(path)!r} cannot be read: {str(e).strip()[:200]}") from None


def verify_loadable(root: Path, tag: str) -> None:
    """Checks, without reading the tensor data (mmap), that every file of a tag is tensors and plain data: DeepSpeed's
    `load_checkpoint` unpickles without restriction, so a checkpoint from elsewhere is vetted first."""
    for f in sorted((root / tag).glob("*.pt")):
        load_file(f, mmap=True)


def single_device_state_dict(root: Path, tag: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter of the model in single-device naming, gathered from DeepSpeed's files at any ep_size."""
    tag_dir = Path(root) / tag
    main = tag_dir / MODEL_STATES
    if not main.is_file():
        raise UserError(f"checkpoint {str(tag_dir)!r}: {main.name} is missing")
    state = {single_device_key(k): v for k, v in load_file(main, trust)["module"].items()}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted(tag_dir.iterdir()):
        if not EXPERT_FILE_RE.match(f.name):
            continue
        for key, value in load_file(f, trust).items():
            m = EXPERT_KEY_RE.match(key)
            if m is None:
                raise UserError(f"checkpoint {str(f)!r}: unexpected key {key}")
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
    for (prefix, name), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise UserError(f"checkpoint {str(tag_dir)!r}: experts of {prefix} are incomplete ({ids})")
        state[f"{prefix}.experts.{name}"] = torch.stack([per_expert[i] for i in ids])
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
