"""Finding the config and the weights the analysis commands work on, and the validation data to run.

`--checkpoint` may be a training run's DeepSpeed checkpoint directory (any ep_size; loaded as one single-device
model with every expert), a directory written by `vimoe prune` (`model.safetensors` + `config.yaml`), or a weights
file (`.safetensors`, `.pt`) that `model.pretrained` accepts. Without `--config`, the run's resolved `config.yaml` is
looked up in the checkpoint directory and its two parents (`RUN/checkpoints/STEP/`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from vimoe_dist.config import Config, load_config
from vimoe_dist.errors import UserError

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


def load_model(cfg: Config, checkpoint: str | Path):
    """A single-device model with every expert, in eval mode, on CPU."""
    file = weights_file(checkpoint)
    if file is None:
        from vimoe_dist.train.checkpoint import load_model as load_training_checkpoint

        model = load_training_checkpoint(cfg, str(checkpoint))
    else:
        model = load_weights_file(cfg, file)
    return model.eval()


def load_weights_file(cfg: Config, file: Path):
    """`build_model` with `model.pretrained` = `file`; dense FFNs are first widened to the file's (a block pruned
    with `--mode average` next to a shared expert holds both hidden layers)."""
    from vimoe_dist.analysis.prune import fit_dense_ffns, read_dense_ffn_sizes
    from vimoe_dist.model import build_model, load_state_dict_file

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pretrained = None
    model = build_model(model_cfg)
    state = load_state_dict_file(file, cfg.run.trust_checkpoint)
    fit_dense_ffns(model, read_dense_ffn_sizes(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(
            f"--checkpoint {file}: does not fit model.moe.layers={cfg.model.moe.layers!r}: "
            f"{'missing' if missing else 'unexpected'} key {key}"
        )
    return model


def class_names(cfg: Config) -> list[str] | None:
    """Class names from the validation shards' manifest, when there is one."""
    try:
        from vimoe_dist.data.loader import resolve_split

        _, _, manifest = resolve_split(cfg, "data.val", need_counts=False)
    except (ImportError, UserError):
        return None
    if manifest is None or len(manifest.classes) != cfg.model.num_classes:
        return None
    return list(manifest.classes)
