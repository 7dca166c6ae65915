"""Finding the config and the weights a command works on, and loading them as one single-device model: the one
loader of `vimoe eval`, `vimoe export`, `vimoe analyze` and `vimoe prune`.

`--checkpoint` may be a training run's DeepSpeed checkpoint directory (a run, its `checkpoints/` or one tag; any
ep_size; loaded as one single-device model with every expert), a directory written by `vimoe prune`
(`model.safetensors` + `config.yaml`), or a weights file (`.safetensors`, `.pt`) that `model.pretrained` accepts.
Without `--config`, the analysis commands look the run's resolved `config.yaml` up in the checkpoint directory and
its two parents (`RUN/checkpoints/STEP/`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from vimoe_dist.config import Config, load_config
from vimoe_dist.errors import UserError

if TYPE_CHECKING:  # torch is imported by the functions that need it: the CLI imports this module
    from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def find_config(checkpoint: str | Path) -> Path:
    """The `config.yaml` nearest above `checkpoint` (itself, its parent, its grandparent)."""
    path = Path(checkpoint).resolve()
    start = path if path.is_dir() else path.parent
    for folder in (start, *list(start.parents)[:2]):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"--checkpoint {checkpoint}: no config.yaml in it or the two folders above; pass --config FILE")


def resolve_config(config: str | None, checkpoint: str, overrides: list[str], data: str | None) -> Config:
    """The validated config: `--config` (or the run's), then the overrides, then `--data` as data.val."""
    if not Path(checkpoint).exists():
        raise UserError(f"--checkpoint {checkpoint}: no such file or directory")
    path = Path(config) if config else find_config(checkpoint)
    extra = [f"data.val={data}"] if data else []
    return load_config(path, [*overrides, *extra])


def weights_file(checkpoint: str | Path) -> Path | None:
    """The single weights file of `checkpoint` when it is one (or a `vimoe prune` folder), else None."""
    path = Path(checkpoint)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        return path
    if path.is_dir() and (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    return None


def load_model(cfg: Config, checkpoint: str | Path) -> nn.Module:
    """A single-device model with every expert, in eval mode, on CPU (the caller moves it to its device); needs no
    process group and no DeepSpeed."""
    file = weights_file(checkpoint)
    model = load_training_checkpoint(cfg, checkpoint) if file is None else load_weights_file(cfg, file)
    return model.eval()


def load_training_checkpoint(cfg: Config, checkpoint: str | Path) -> nn.Module:
    """The model of a training checkpoint (a run, its `checkpoints/` or a tag), gathered at any ep_size."""
    from vimoe_dist.parallel.checkpoint_layout import single_device_state_dict
    from vimoe_dist.train.checkpoint import resolve_checkpoint

    root, tag = resolve_checkpoint(checkpoint)
    model = _untrained_model(cfg)
    state = single_device_state_dict(root, tag, trust=cfg.run.trust_checkpoint)
    check_fits(model, state, f"{root / tag}")
    model.load_state_dict(state)
    return model


def load_weights_file(cfg: Config, file: Path) -> nn.Module:
    """`build_model` with `model.pretrained` = `file`; dense FFNs are first widened to the file's (a block pruned
    with `--mode average` next to a shared expert holds both hidden layers)."""
    from vimoe_dist.analysis.prune import fit_dense_ffns, read_dense_ffn_sizes
    from vimoe_dist.model import load_state_dict_file

    model = _untrained_model(cfg)
    state = load_state_dict_file(file, cfg.run.trust_checkpoint, what="--checkpoint")
    try:
        sizes = read_dense_ffn_sizes(file)
    except (ValueError, TypeError, AttributeError) as e:  # metadata written by someone else
        raise UserError(f"--checkpoint {file}: unreadable dense_ffn_hidden metadata ({str(e)[:100]})") from None
    fit_dense_ffns(model, sizes)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"--checkpoint {file}: does not fit this model: {key} is {tuple(value.shape)}, "
                f"the model's is {tuple(own[key].shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(
            f"--checkpoint {file}: does not fit model.moe.layers={cfg.model.moe.layers!r}: "
            f"{'missing' if missing else 'unexpected'} key {key}"
        )
    return model


def check_fits(model: nn.Module, state: dict, where: str) -> None:
    """A checkpoint of another model is a one-line error naming the first key that differs."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise UserError(f"checkpoint {where!r} does not fit this model: it has no {key}")
        if state[key].shape != value.shape:
            raise UserError(
                f"checkpoint {where!r} does not fit this model: {key} is {tuple(state[key].shape)}, "
                f"the model's is {tuple(value.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"checkpoint {where!r} does not fit this model: unexpected {extra[0]}")


def _untrained_model(cfg: Config) -> nn.Module:
    """The config's model with fresh weights (its `model.pretrained` is not read: the checkpoint replaces them)."""
    from vimoe_dist.model import build_model

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pretrained = None
    return build_model(model_cfg)
