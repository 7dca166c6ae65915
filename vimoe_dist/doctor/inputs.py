"""Checks of a run's inputs (`vimoe doctor --config FILE`), each through the project's own code: the first shard
of each split is read and decoded by the data pipeline's reader and decoder, the pretrained file is read by
`load_state_dict_file` and fitted into the model by `build_model`, and the model is built (on the meta device: no
memory, no time) to report its size and FLOPs per image."""

from __future__ import annotations

from pathlib import Path

from vimoe_dist.config import Config
from vimoe_dist.doctor.node import CHECKPOINT_BYTES_PER_PARAM
from vimoe_dist.doctor.result import FAIL, OK, SKIP, WARN, Check

SAMPLES_TO_DECODE = 8


def check_shard(cfg: Config, key: str) -> Check:
    """The first shard of `data.train` / `data.val` opens and its first samples decode to images with labels the
    model accepts (the manifest's labels are checked against model.num_classes on the way)."""
    from vimoe_dist.data.baddata import BadSample
    from vimoe_dist.data.loader import resolve_split
    from vimoe_dist.data.tario import ShardReader
    from vimoe_dist.data.transforms import SampleDecoder

    name = key.replace(".", "_")
    if getattr(cfg.data, key.split(".")[1]) is None:
        if key == "data.val":
            return Check(name, SKIP, "data.val is not set: no evaluation during training")
        return Check(name, FAIL, "data.train is not set", fix="set data.train to a shard pattern")
    urls, _, _ = resolve_split(cfg, key, need_counts=False)  # UserError (missing shard, labels) -> fail
    first = urls[0]
    reader, decoder = ShardReader(first), SampleDecoder(cfg, training=key == "data.train")
    decoded, bad, shape = 0, [], None
    for sample in reader:
        try:
            image, _ = decoder(sample)
            decoded, shape = decoded + 1, tuple(image.shape)
        except BadSample as e:
            bad.append(str(e))
        if decoded + len(bad) >= SAMPLES_TO_DECODE:
            break
    data = {"shards": len(urls), "first": first, "decoded": decoded, "bad": bad}
    if reader.error is not None:
        return Check(name, FAIL, f"{first}: unreadable: {reader.error}", fix="rewrite or replace the shard", data=data)
    if not decoded:
        why = bad[0] if bad else "it holds no samples"
        return Check(name, FAIL, f"{first}: nothing decodes ({why})", fix="rewrite the shards (vimoe data ...)",
                     data=data)  # fmt: skip
    summary = f"{len(urls)} shard(s); the first {decoded} samples of {first} decode to {shape}"
    if bad:
        return Check(name, WARN, f"{summary}, {len(bad)} bad: {bad[0]}",
                     fix="bad samples are skipped and counted (data.max_bad_fraction)", data=data)  # fmt: skip
    return Check(name, OK, summary, data=data)


def check_pretrained(cfg: Config) -> Check:
    """The file reads with `load_state_dict_file` (weights only unless run.trust_checkpoint) and fits the model."""
    from vimoe_dist.model import build_model, load_state_dict_file

    source = cfg.model.pretrained
    if source is None:
        return Check("pretrained", SKIP, "model.pretrained is null: the model starts from random weights")
    if not Path(source).exists():
        if "/" in source or source.endswith((".pth", ".pt", ".bin", ".safetensors")):
            return Check("pretrained", FAIL, f"model.pretrained: file {source!r} does not exist",
                         fix="copy the weights to every node (or a shared file system) and point at them")  # fmt: skip
        return Check("pretrained", WARN, f"model.pretrained: {source!r} is a timm name: every rank downloads it",
                     fix="download the weights once and point model.pretrained at the file")  # fmt: skip
    state = load_state_dict_file(source, cfg.run.trust_checkpoint)
    numel = sum(v.numel() for v in state.values() if hasattr(v, "numel"))
    del state
    build_model(cfg.model, trust_checkpoint=cfg.run.trust_checkpoint)  # ConfigError when it does not fit
    return Check("pretrained", OK, f"{source}: {numel / 1e6:.1f} M weights, loads into the model",
                 data={"file": source, "weights": numel})  # fmt: skip


def check_model(cfg: Config) -> Check:
    """Builds the model on the meta device: parameters, model FLOPs per image (nominal routing) and the size of a
    checkpoint, which the disk check uses."""
    import torch

    from vimoe_dist.model import build_model
    from vimoe_dist.model.flops import model_flops

    model_cfg = type(cfg.model)(**{**vars(cfg.model), "pretrained": None})
    with torch.device("meta"):
        model = build_model(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    flops = model_flops(model)
    data = {
        "params": params,
        "flops_per_image": flops.as_dict(),
        "checkpoint_bytes": params * CHECKPOINT_BYTES_PER_PARAM,
    }
    return Check(
        "model", OK, f"{cfg.model.backbone} at {cfg.model.img_size} px: {params / 1e6:.1f} M parameters, "
        f"{flops.forward / 1e9:.2f} GFLOP per image forward, {flops.training / 1e9:.2f} training (3 x forward)",
        data=data,
    )  # fmt: skip
