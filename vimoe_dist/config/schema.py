"""The configuration schema: one dataclass per section of a run's YAML file, with its defaults; nothing here reads
or checks a value (coerce.py builds the dataclasses from YAML data, bounds.py and validation.py check the values).
`ConfigError` lives here because every other module of the package raises it and this one imports none of them;
`to_dict` turns a resolved config back into plain YAML-able data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vimoe_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message is one line naming the key."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto: continue from the latest checkpoint in out_dir; never; or a checkpoint directory
    trust_checkpoint: bool = False  # allow torch.load without weights_only for files we did not write
    device: str = "auto"  # auto: CUDA when usable (an error under a GPU allocation without it); cuda; cpu


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-3  # peak learning rate for the global batch
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT); 0.65-0.75 when fine-tuning from DINOv2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 disables
    label_smoothing: float = 0.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    stop_at: int = 0  # checkpoint and exit cleanly at this step (time-boxed jobs); 0: run to train.steps
    progress: bool = True


@dataclass
class ParallelConfig:
    ep_size: int = 1
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16; the router always computes in fp32
    timeout_s: float = 600.0  # collective timeout: a dead or hung rank ends the job within this
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    # merged into the generated DeepSpeed config (its monitors, communication settings, ...); keys the trainer owns
    # (batch sizes, ZeRO stage, precision, optimizer, scheduler, clipping) are refused: parallel/ds_config.py
    deepspeed: dict = field(default_factory=dict)


@dataclass
class MoEConfig:
    layers: Any = "last-2"  # "last-L" or a list of block indices; "last-0" / [] is the dense baseline
    num_experts: int = 8
    router: str = "tc-softmax"
    top_k: int = 2
    capacity_factor: float | None = 1.25  # None: dropless (token choice only)
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    min_capacity: int = 1
    shared_expert: bool = True
    routing: str = "image"  # image | token
    pool: str = "cls"  # image routing: cls | mean (of patch tokens)
    group_size: int = 8  # images per routing group; capacity and routing never cross groups
    hidden_ratio: float | None = None  # expert hidden size / dim; None: the backbone's mlp_ratio
    # router options: each router takes the ones model/moe/registry.py lists for it; setting another is an error
    bpr: bool = True
    renormalize: bool = False
    noise_std: float = 0.0  # gate noise std relative to 1/E (V-MoE): N(0, (noise_std / E)^2); absolute for soft
    slots_per_expert: int | None = None  # soft; None: round(U * capacity_factor / E) per group of U units (vmoe)
    sinkhorn_iters: int = 10
    sparse_gamma: float = 1.0
    sparse_iters: int = 50
    # auxiliary loss weights
    importance_loss: float = 0.0
    load_loss: float = 0.0
    switch_loss: float = 0.01
    z_loss: float = 0.0


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch14_dinov2"
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    pretrained: str | None = None  # a checkpoint file (timm or DINOv2 layout) or, online, a timm name
    drop_path: float = 0.0
    global_pool: str = "token"
    backbone_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (depth, embed_dim, ...)
    dense_ffn_hidden: dict = field(default_factory=dict)  # block -> hidden size of its dense FFN (`vimoe prune`)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class DataConfig:
    train: Any = None  # shard pattern(s): brace pattern, list, local path, http(s)://, pipe: (needs allow_pipe)
    val: Any = None
    num_workers: int = 2
    prefetch: int = 2
    shuffle_buffer: int = 1000
    # exact (the default): the same global batches on any number of ranks, and a resume continues with the very batches
    # it would have had; needs local uncompressed tars. stream: sequential reads (http(s), pipe:, gz), a little faster,
    # and a resume continues with fresh data. `vimoe bench data` measures both.
    order: str = "exact"
    allow_pipe: bool = False
    max_bad_fraction: float = 0.01
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: str | None = None  # a timm auto-augment string, e.g. rand-m9-mstd0.5-inc1
    mixup: float = 0.0
    cutmix: float = 0.0
    crop_pct: float = 0.875
    color_jitter: float = 0.0  # timm's color jitter strength (it is off whenever auto_augment is set)
    interpolation: str = "bicubic"  # resize interpolation: bicubic | bilinear | nearest | random
    http_timeout_s: float = 600.0  # total time to read one http(s) shard (a silent server fails within it)
    max_image_pixels: int = 40_000_000  # a larger image is a bad sample (decompression bombs below PIL's limit)


@dataclass
class WandbConfig:
    project: str | None = None  # W&B is on when a project or a mode other than disabled is set
    entity: str | None = None
    name: str | None = None  # the run's display name; None: the run directory's name
    group: str | None = None
    tags: Any = field(default_factory=list)  # a list of strings
    mode: str | None = None  # offline | online | disabled; None: $WANDB_MODE, else online


@dataclass
class MetricsConfig:
    port: int = 0  # 0: no Prometheus endpoint; rank r serves on port + LOCAL_RANK (shipped configs: 19400)
    addr: str = "127.0.0.1"  # loopback by default: the endpoint is unauthenticated
    port_search: bool = True  # a taken port: one warning and the next free one (false: a one-line error)
    tensorboard: bool = False  # rank 0 writes RUN/tb/ (needs the tensorboard package)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, rank 0 (needs the wandb package)
    pushgateway: str | None = None  # http(s)://host:port or host:port; each rank pushes its final values at exit
    push_timeout_s: float = 10.0
    job: str = "vimoe"  # the `job` label of every series
    peak_tflops: float | None = None  # dense peak TFLOP/s of one device for MFU; None: the GPU's datasheet figure


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))
