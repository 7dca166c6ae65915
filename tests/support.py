"""Helpers several test suites share (on the path through `pythonpath` in pyproject.toml)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

# a 2-block ViT with both FFNs as 4-expert MoE layers on the digits shards: seconds per step on CPU ranks, and
# every moving part of a real run (routing groups, expert parallelism, checkpoints, exact data order)
TINY_RUN = [
    "model.backbone=vit_tiny_patch16_224",
    "model.img_size=16",
    "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.moe.layers=last-2",
    "model.moe.num_experts=4",
    "model.moe.group_size=4",
    "train.global_batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=2",
    "data.order=exact",
    "data.num_workers=0",
]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`vimoe ARGV` in this process: its exit code, stdout and stderr (captured by pytest's `capsys`)."""
    import pytest

    from vimoe_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def unset_env(monkeypatch, *names: str) -> None:
    """Removes `names` from os.environ for one test, and removes them again after it if the code under test set them:
    `monkeypatch.delenv(name, raising=False)` records nothing for an unset variable, so a variable the test's code
    sets (LOCAL_RANK, DS_ACCELERATOR, ...) would leak into every later test."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def tiny_dataset(out: Path) -> Path:
    """A data set directory (`train.json`, `val.json` and their shards) of one class that the data checks accept:
    for tests of commands that check the data before they start (`vimoe launch`, `vimoe config show`) and never
    train on it. One class, so that it fits any `model.num_classes`."""
    from vimoe_dist.data.synthetic import write_synthetic

    if not (out / "train.json").is_file():
        write_synthetic(out, num_classes=1, num_images=2, size=8, num_val=1, progress=False)
    return out


def data_yaml(out: Path) -> str:
    """The `data:` section naming `tiny_dataset(out)`, for a test's config file."""
    d = tiny_dataset(out)
    return f"data:\n  train: {d}\n  val: {d}\n"


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (read from Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def raw_request(port: int, payload: bytes, read: bool = True) -> bytes:
    """Sends raw bytes to 127.0.0.1:`port` and returns whatever comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(payload)
        if not read:
            return b""
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


# The start of a stand-in for `python` in `vimoe study --launch`: it receives `-m vimoe_dist train --config FILE
# key=value...`, applies the overrides with plain YAML (importing torch per point would dominate the tests) and
# computes a top-1 that depends on L and the shared expert; each test appends what a finished run leaves.
FAKE_TRAINER_HEAD = """
import json, os, sys, pathlib, yaml
args = sys.argv[1:]
assert args[:4] == ["-m", "vimoe_dist", "train", "--config"], args
cfg = yaml.safe_load(open(args[4]))
for item in args[5:]:
    key, value = item.split("=", 1)
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)
out = pathlib.Path(cfg["run"]["out_dir"])
out.mkdir(parents=True, exist_ok=True)
moe = cfg["model"]["moe"]
L = int(moe["layers"][5:])
top1 = 0.5 + 0.05 * L * (1 if moe["shared_expert"] else -1)
"""
