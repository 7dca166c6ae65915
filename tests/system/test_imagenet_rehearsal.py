"""The README's "ImageNet from DINOv2" path, walked end to end: every line of its code block runs here, in order.

What stands in for what a cluster user has:
- ImageNet: 1,000 class folders (`nXXXXXXXX/`) of 2 tiny JPEGs each, among them a CMYK JPEG, a PNG named `.JPEG`
  and a grayscale JPEG (ImageNet's odd files), and a flat val folder of 1,000 files with Kaggle's
  `LOC_val_solution.csv`;
- DINOv2's release file: `pretrained/dinov2_vits14_pretrain.pth` with the official key names and shapes (a 518-pixel
  position embedding of 37 x 37 + 1 positions, `ls1.gamma`/`ls2.gamma`, `mask_token`, no head), written from random
  tensors at the rehearsal's width and depth (the `curl` line is the one line not run as written);
- 8 GPUs: 2 CPU ranks (`--nproc 8` and `--gpus-per-node 8` become 2); Slurm: `--submit --dry-run` (the script is
  rendered and every check runs; nothing is submitted).

The shipped `vimoe_s14_imagenet` config is used as it is, overridden only in sizes (SIZES) and its data directory:
if a user's path breaks, this test breaks. Weights are loaded from `pretrained/` relative to the working directory,
as the config says.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

REPO = Path(__file__).resolve().parents[2]
README_DATA = "/data/imagenet-wds"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
WIDTH, DEPTH, HEADS, PATCH = 24, 4, 6, 14  # ViT-S/14's heads and patch; the MoE in the last 4 blocks, as shipped
SIZES = [
    "model.img_size=28",  # 2 x 2 patches of 14 pixels
    f"model.backbone_kwargs={{embed_dim: {WIDTH}, depth: {DEPTH}}}",
    "train.global_batch_size=64",  # one routing group of 32 images per rank
    "train.steps=2",
    "parallel.ep_size=2",  # 2 ranks stand in for 8 GPUs
    "data.num_workers=0",  # 2 cores
]
NUM_CLASSES = 1000
ODD_FILES = {(0, 1): ("JPEG", "CMYK"), (1, 0): ("PNG", "RGB"), (2, 1): ("JPEG", "L")}  # (class, image) -> format


def wnid(c: int) -> str:
    return f"n{1440764 + 7919 * c:08d}"


def jpeg(seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def fake_imagenet(root: Path) -> dict[str, Path]:
    """ILSVRC2012_img_train/<wnid>/<wnid>_<i>.JPEG, ILSVRC2012_img_val/ILSVRC2012_val_<n>.JPEG (flat) and Kaggle's
    LOC_val_solution.csv (`ImageId,PredictionString`, the class first in the prediction string)."""
    train, val = root / "ILSVRC2012_img_train", root / "ILSVRC2012_img_val"
    for c in range(NUM_CLASSES):
        (train / wnid(c)).mkdir(parents=True)
        for i in range(2):
            fmt, mode = ODD_FILES.get((c, i), ("JPEG", "RGB"))
            (train / wnid(c) / f"{wnid(c)}_{i}.JPEG").write_bytes(jpeg(2 * c + i, fmt, mode))
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for n in range(1, NUM_CLASSES + 1):
        c = (n * 7) % NUM_CLASSES
        (val / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg(10_000 + n, "JPEG", "CMYK" if n == 5 else "RGB"))
        rows.append(f"ILSVRC2012_val_{n:08d},{wnid(c)} 1 2 18 20")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return {
        "ILSVRC2012_img_train": train,
        "ILSVRC2012_img_val": val,
        "LOC_val_solution.csv": root / "LOC_val_solution.csv",
    }


def dinov2_release_state(width: int, depth: int) -> dict[str, torch.Tensor]:
    """The key names and shapes of `dinov2_vits14_pretrain.pth` (the release of facebookresearch/dinov2: a plain
    state dict, blocks not chunked, no head) at `width` x `depth`, filled with random values."""
    g = torch.Generator().manual_seed(0)
    grid = 518 // PATCH  # the release's 518-pixel position embedding: 37 x 37 patches and the class token

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    state = {
        "cls_token": rand(1, 1, width),
        "pos_embed": rand(1, grid * grid + 1, width),
        "mask_token": torch.zeros(1, width),
        "patch_embed.proj.weight": rand(width, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(width),
    }
    for b in range(depth):
        p = f"blocks.{b}."
        state |= {
            p + "norm1.weight": 1 + rand(width), p + "norm1.bias": rand(width),
            p + "attn.qkv.weight": rand(3 * width, width), p + "attn.qkv.bias": rand(3 * width),
            p + "attn.proj.weight": rand(width, width), p + "attn.proj.bias": rand(width),
            p + "ls1.gamma": torch.full((width,), 0.1),
            p + "norm2.weight": 1 + rand(width), p + "norm2.bias": rand(width),
            p + "mlp.fc1.weight": rand(4 * width, width), p + "mlp.fc1.bias": rand(4 * width),
            p + "mlp.fc2.weight": rand(width, 4 * width), p + "mlp.fc2.bias": rand(width),
            p + "ls2.gamma": torch.full((width,), 0.1),
        }  # fmt: skip
    state |= {"norm.weight": 1 + rand(width), "norm.bias": rand(width)}
    return state


def readme_commands() -> list[str]:
    """The lines of the README's code block after "ImageNet from DINOv2", comments removed."""
    text = (REPO / "README.md").read_text()
    start = text.index("ImageNet from DINOv2")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, "the README's ImageNet block is gone"
    return [re.sub(r"\s+# .*$", "", line).strip() for line in block.group(1).splitlines() if line.strip()]


def to_here(line: str, tmp: Path, sources: dict[str, Path], data: Path) -> list[str] | None:
    """The argv that runs README `line` here (see the module docstring); None for the `curl` line."""
    if line.startswith("mkdir -p pretrained && curl "):
        assert line.endswith(f"-fLo pretrained/dinov2_vits14_pretrain.pth {DINOV2_URL}"), line
        return None
    argv = shlex.split(line)
    assert argv[0] == "vimoe", line
    argv = [sys.executable, "-m", "vimoe_dist", *argv[1:]]
    argv = [str(sources[a]) if a in sources else str(data) if a == README_DATA else a for a in argv]
    for flag in ("--nproc", "--gpus-per-node"):
        if flag in argv:
            i = argv.index(flag) + 1
            assert argv[i] == "8", line
            argv[i] = "2"
    if "--submit" in argv:
        argv.append("--dry-run")  # no Slurm here: render the script, check everything, submit nothing
    if argv[argv.index("--config") + 1 if "--config" in argv else 0] == "vimoe_s14_imagenet":
        argv += [*SIZES, f"data.train={data}", f"data.val={data}"]
    return argv


def run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv[2:])}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_the_readme_imagenet_path_end_to_end(tmp_path):
    sources = fake_imagenet(tmp_path / "imagenet")
    data = tmp_path / "imagenet-wds"
    work = tmp_path / "work"
    (work / "pretrained").mkdir(parents=True)
    release = dinov2_release_state(WIDTH, DEPTH)
    torch.save(release, work / "pretrained" / "dinov2_vits14_pretrain.pth")
    wnids = [wnid(c) for c in range(NUM_CLASSES)]
    run_dir = work / "runs" / "vimoe_s14_imagenet"

    done = []
    for line in readme_commands():
        argv = to_here(line, tmp_path, sources, data)
        if argv is not None:
            done.append((line, run(argv, work)))
    assert len(done) == 9, [line for line, _ in done]

    def out(start: str, dry_run: bool = False) -> subprocess.CompletedProcess:
        return next(p for line, p in done if line.startswith(start) and ("--dry-run" in line) == dry_run)

    # the data set: both splits, every odd file decoded, one class order
    train, val = (json.loads((data / f"{split}.json").read_text()) for split in ("train", "val"))
    assert train["num_samples"] == 2 * NUM_CLASSES and val["num_samples"] == NUM_CLASSES
    assert train["classes"] == val["classes"] == wnids
    # config show and the dry runs: the layout and the data, checked before any rank
    layout = out("vimoe config show").stdout
    assert "#   ranks:                   2 (--nproc 2)" in layout and "2,000 images in " in layout, layout
    for dry_run in (True, False):
        checked = out("vimoe launch local", dry_run).stderr
        assert "# checked: --nproc 2; run.device auto (cpu here); data.train: 2 shards" in checked, checked
        assert "1,000 classes" in checked
    assert "export VIMOE_GPUS_PER_NODE=2" in out("vimoe launch slurm").stdout
    # the training run: the start-up line, the class list, 2 steps, the final evaluation, the metrics targets
    log = out("vimoe launch local").stderr
    assert re.search(r"start: device cpu .*, backend gloo, precision bf16, 2 ranks, ep_size 2 \(4 of 8 experts", log)
    assert "data.train: 2 shards, 2,000 samples; data.val: 1 shards, 1,000 samples; 1,000 classes" in log, log
    assert "keys not in" not in log  # every backbone weight came from the release file
    assert (run_dir / "classes.txt").read_text().splitlines() == wnids
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == 2 and json.loads((run_dir / "eval.json").read_text())["images"] == NUM_CLASSES
    # the ranks published their metrics endpoints (port 19400, as shipped) and emptied the file at the end
    assert json.loads((run_dir / "prometheus_targets.json").read_text()) == []
    # eval, analyze routing, export: class names in their output
    result = json.loads(out("vimoe eval").stdout.splitlines()[-1])
    assert result["images"] == NUM_CLASSES and result["classes_named"] and result["device"] == "cpu"
    assert all(w["class"] in wnids for w in result["worst_classes"])
    per_class = (work / "per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("index,class,") and per_class[1].split(",")[1] in wnids
    routing = json.loads((run_dir / "routing" / "routing.json").read_text())
    assert routing["classes_named"] and sorted(routing["expert_classes"]) == ["0", "1", "2", "3"]  # last-4 of 4
    named = [c for experts in routing["expert_classes"].values() for cs in experts.values() for c in cs]
    assert named and set(named) <= set(wnids)
    assert "classes most routed to each expert: " in out("vimoe analyze routing").stdout
    exported = work / "vimoe_s14.safetensors"
    assert exported.is_file() and f"{NUM_CLASSES} class names" in out("vimoe export").stdout
    with safe_open(str(exported), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == wnids


def test_the_release_file_is_what_the_model_starts_from(tmp_path):
    """The release layout loads into the shipped config's backbone, every key used: the 518-pixel position embedding
    resampled to the run's grid, `mask_token` dropped, layer scales kept, the dense FFN upcycled into the experts."""
    from vimoe_dist.config import load_config
    from vimoe_dist.model import build_model

    path = tmp_path / "dinov2_vits14_pretrain.pth"
    release = dinov2_release_state(WIDTH, DEPTH)
    torch.save(release, path)
    cfg = load_config("vimoe_s14_imagenet", [*SIZES, f"model.pretrained={path}", f"data.train={tmp_path}"])
    model = build_model(cfg.model)
    state = model.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.weight"], release["blocks.0.attn.qkv.weight"])
    assert torch.equal(state["blocks.3.ls2.gamma"], release["blocks.3.ls2.gamma"])
    assert torch.equal(state["cls_token"], release["cls_token"])
    assert state["pos_embed"].shape == (1, 2 * 2 + 1, WIDTH)  # 37 x 37 resampled to 2 x 2
    assert torch.equal(state["pos_embed"][:, 0], release["pos_embed"][:, 0])  # the class token's position
    experts = state["blocks.3.mlp.experts.fc1_weight"]  # last-4: block 3 is an MoE block, upcycled
    assert experts.shape[0] == 8 and torch.equal(experts[5], release["blocks.3.mlp.fc1.weight"])
