"""Shipped configs by name, and `vimoe config show`: the resolved config plus its layout after the checks `vimoe
train` makes before it builds the model. Runs the real command in this process on real digits shards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from support import run_cli as run

from vimoe_dist.config import ConfigError, load_config, to_dict
from vimoe_dist.resources import configs_dir, find_config, shipped_configs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """A working directory holding the digits shards where configs/digits.yaml looks for them (data/digits)."""
    from vimoe_dist.data import write_digits

    cwd = tmp_path_factory.mktemp("cwd")
    write_digits(cwd / "data" / "digits")
    return cwd


def test_shipped_configs_by_name_and_the_checkout_link():
    names = shipped_configs()
    assert {"digits", "vimoe_s14_imagenet", "vimoe_b14_imagenet", "routers/soft"} <= set(names)
    assert (REPO / "configs").resolve() == configs_dir().resolve() == (REPO / "vimoe_dist" / "configs").resolve()
    by_path = to_dict(load_config(REPO / "configs" / "digits.yaml"))
    assert to_dict(load_config("digits")) == to_dict(load_config("digits.yaml")) == by_path
    soft = load_config("routers/soft")  # an overlay: its `base:` is found next to it
    assert soft.model.moe.router == "soft" and soft.parallel.ep_size == 8


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_configs_name_data_sets_by_directory(name):
    """A data set directory's manifests name its shards, so no shard count in a config can disagree with the data
    (a brace range once named 1,024 of ImageNet's 1,282 train shards and 64 of its 50 val shards)."""
    cfg = load_config(name)
    for key in ("train", "val"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        assert isinstance(value, str) and not re.search(r"[{}*?\[]|\.tar$|://", value), (name, key, value)


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.yaml").write_text("train: {steps: 7}\n")
    assert load_config("digits.yaml").train.steps == 7  # the user's file
    assert load_config("digits").train.steps == 300  # no file named `digits`: the shipped one
    assert find_config("digits") == shipped_configs()["digits"]
    assert find_config("configs/routers/soft.yaml") == shipped_configs()["routers/soft"]  # as documented


def test_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'digitz' is neither a file nor a shipped config; shipped: digits, "):
        load_config("digitz")
    code, out, err = run(["config", "show", "--config", "digitz"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "vimoe_s14_imagenet" in err and "routers/soft" in err


def layout(out: str) -> dict[str, str]:
    return dict(re.findall(r"^#   ([a-z -]+):\s+(.*)$", out, re.M))


def test_show_prints_the_resolved_config_and_its_layout(digits_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(digits_dir)
    code, out, err = run(["config", "show", "--config", "digits", "--nproc", "2", "train.steps=45"], capsys)
    assert code == 0, err
    assert yaml.safe_load(out) == to_dict(load_config("digits", ["train.steps=45"]))
    rows = layout(out)
    # configs/digits.yaml: global batch 64, ep_size 2, 4 experts, groups of 8 images; 1,437 train / 360 val digits
    assert rows["ranks"].startswith("2 (--nproc 2)")
    assert rows["expert-parallel groups"].startswith("1 of 2 ranks")
    assert rows["experts per rank"].startswith("2 of 4")
    assert rows["per-rank batch"].startswith("32 images")
    assert rows["micro-batch"].startswith("32 images")
    assert rows["routing groups per rank"].startswith("4 per micro-batch")
    assert rows["train set"] == "1,437 images in 12 shards" and rows["val set"] == "360 images in 3 shards"
    assert rows["steps per epoch"].startswith("22.5 (train.steps 45 = 2.00 epochs)")  # 1437 / 64 = 22.45
    saved = tmp_path / "resolved.yaml"  # the output is a config file itself
    saved.write_text(out)
    assert to_dict(load_config(saved)) == yaml.safe_load(out)


def test_show_on_nodes_with_accumulation(digits_dir, monkeypatch, capsys):
    monkeypatch.chdir(digits_dir)
    argv = ["config", "show", "--config", "configs/digits.yaml", "--nodes", "2", "--gpus-per-node", "2"]
    code, out, err = run([*argv, "train.grad_accum=2"], capsys)
    assert code == 0, err
    rows = layout(out)
    assert rows["ranks"].startswith("4 (--nodes 2 x --gpus-per-node 2)")
    assert rows["expert-parallel groups"].startswith("2 of 2 ranks")
    assert rows["replicas of each expert"].startswith("2 ")
    assert rows["per-rank batch"].startswith("16 images") and rows["micro-batch"].startswith("8 images")
    assert rows["routing groups per rank"].startswith("1 per micro-batch")


def test_without_ranks_given_the_smallest_job_is_shown(digits_dir, monkeypatch, capsys):
    monkeypatch.chdir(digits_dir)
    code, out, err = run(["config", "show", "--config", "digits"], capsys)
    assert code == 0, err
    assert layout(out)["ranks"].startswith("2 (parallel.ep_size;")


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--nproc", "3"], "parallel.ep_size: 2 does not divide the world size 3"),
        (["--nproc", "4", "model.moe.group_size=32"], "model.moe.group_size: 32 does not divide"),
        (["--nproc", "2", "--nodes", "1", "--gpus-per-node", "2"], "either --nproc or --nodes"),
        (["--nodes", "2"], "--nodes and --gpus-per-node go together"),
        (["--nproc", "0"], "--nproc: must be at least 1"),
        (["model.pretrained=/nonexistent/vit.pth"], "model.pretrained"),
        (["data.train=data/digits/train-{000000..000099}.tar"], "data.train"),
        (["model.num_classes=5"], "model.num_classes=5"),
        (["model.moe.top_k=9"], "model.moe.top_k"),
    ],
)
def test_the_checks_of_vimoe_train_fail_in_one_line(digits_dir, monkeypatch, capsys, extra, names):
    monkeypatch.chdir(digits_dir)
    code, out, err = run(["config", "show", "--config", "digits", *extra], capsys)
    assert code == 2 and out == ""
    assert err.startswith("vimoe config: error: ") and err.count("\n") == 1 and names in err, err


def test_missing_data_is_caught_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/digits here
    code, out, err = run(["config", "show", "--config", "digits", "--nproc", "2"], capsys)
    assert code == 2 and "data.train" in err and err.count("\n") == 1


def test_config_list_names_every_shipped_config(capsys):
    code, out, _ = run(["config", "list"], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list(shipped_configs())


@pytest.mark.parametrize("spec", ["digits", "configs/digits.yaml"])
def test_slurm_scripts_name_the_config_so_the_ranks_find_it(spec, tmp_path, monkeypatch, capsys):
    """A file goes to the ranks as an absolute path, a shipped name as the name (resolved where the ranks run)."""
    monkeypatch.chdir(REPO if spec.startswith("configs/") else tmp_path)
    code, out, err = run(
        ["launch", "slurm", "--print", "--nodes", "1", "--gpus-per-node", "2", "--no-data-check", "--config", spec],
        capsys,
    )  # the data (data/digits) is not there: the point is the config's name
    assert code == 0, err
    want = str((REPO / "configs" / "digits.yaml").resolve()) if spec.startswith("configs/") else "digits"
    assert re.search(rf"-m vimoe_dist train --config {re.escape(want)}( &)?$", out, re.M), out


def test_the_start_up_line_states_the_job_as_config_show_does(digits_dir, monkeypatch):
    """Rank 0's one line: device, backend, precision, ranks and nodes, experts per rank, per-rank batch with its
    micro-batch and routing groups, and the data set sizes."""
    import torch

    from vimoe_dist.data import check_data
    from vimoe_dist.parallel.env import DistEnv
    from vimoe_dist.train.setup import startup_line

    monkeypatch.chdir(digits_dir)
    cfg = load_config("digits", ["parallel.ep_size=2", "train.grad_accum=2", "model.moe.group_size=4"])
    env = DistEnv(0, 4, 0, 2, 0, 2, "127.0.0.1", 29500, "torchrun")  # 4 ranks on 2 nodes
    line = startup_line(cfg, env, torch.device("cpu"), "gloo", check_data(cfg))
    # global batch 64 over 4 ranks: 16 per rank per step, 2 micro-batches of 8, each 2 routing groups of 4 images
    assert re.sub(r"device cpu \(\d+ threads?\)", "device cpu", line).startswith(
        "start: device cpu, backend gloo, precision fp32, 4 ranks on 2 nodes, ep_size 2 (2 of 4 experts per rank), "
        "16 images per rank per step (micro-batch 8, 2 routing groups of 4); "
    ), line
    assert "\n" not in line and "1,437" in line and "360" in line and "10 classes" in line, line
