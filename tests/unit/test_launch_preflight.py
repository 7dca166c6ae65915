"""Issue 11's bad data, through the launchers: `vimoe launch local|hostfile|slurm` (dry runs included) refuse each in
one line naming the file, before any rank starts, and print nothing they would run. (What each check finds is
tested in test_data_check.py; here, that every launcher runs it, for the world size it would start.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vimoe_dist.cli import main

LAUNCHES = {
    "local": ["launch", "local", "--nproc", "2", "--dry-run"],
    "hostfile": ["launch", "hostfile", "--hostfile", "{hostfile}", "--dry-run"],
    "slurm": ["launch", "slurm", "--nodes", "1", "--gpus-per-node", "2"],
}


@pytest.fixture
def data(tmp_path) -> Path:
    """A private copy of a 3-class data set (every class in both splits), free to damage."""
    from vimoe_dist.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "d", num_classes=3, num_images=6, size=8, num_val=3, progress=False)
    return tmp_path / "d"


def edit(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def launch(form: str, tmp_path: Path, capsys, *overrides: str, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\ntrain:\n  global_batch_size: 16\n")
    argv = [a.replace("{hostfile}", str(tmp_path / "hosts")) for a in LAUNCHES[form]]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra, "--config", str(config), *overrides])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def damage(case: str, d: Path) -> tuple[list[str], str]:
    """Damages the data set `d` as `case` says; returns the overrides naming it and what the error must say."""
    both = [f"data.train={d}", f"data.val={d}"]
    if case == "no manifest":
        empty = d.parent / "not_a_data_set"
        empty.mkdir()
        shutil.copy(d / "train-000000.tar", empty)
        return [f"data.train={empty}", f"data.val={d}"], str(empty)
    if case == "missing shard":
        (d / "val-000000.tar").unlink()
        return both, "val-000000.tar"
    if case == "shard of another size":
        with open(d / "train-000000.tar", "ab") as f:
            f.write(b"\0" * 512)
        return both, "train-000000.tar"
    if case == "classes disagree":
        edit(d / "val.json", lambda m: m.update(classes=["pattern0", "pattern2", "pattern1"]))
        return both, "name different classes"
    if case == "val class the train set lacks":
        edit(d / "train.json", lambda m: m.update(label_counts=[2, 4, 0]))
        return both, "which the train split"
    raise AssertionError(case)


CASES = ["no manifest", "missing shard", "shard of another size", "classes disagree", "val class the train set lacks"]


@pytest.mark.parametrize("form", sorted(LAUNCHES))
@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_line_before_any_rank_starts(data, tmp_path, capsys, form, case):
    overrides, needle = damage(case, data)
    code, out, err = launch(form, tmp_path, capsys, *overrides)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("vimoe launch: error: data.") and needle in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("form", sorted(LAUNCHES))
def test_good_data_passes_and_is_summed_up(data, tmp_path, capsys, form):
    code, out, err = launch(form, tmp_path, capsys, f"data.train={data}", f"data.val={data}")
    assert code == 0, err
    assert "data.train: 1 shards, 6 samples; data.val: 1 shards, 3 samples; 3 classes" in err, err


def test_no_data_check_leaves_the_data_to_the_ranks(tmp_path, capsys):
    """Data on the nodes' own disks is not there on the login node: `--no-data-check` says so."""
    missing = tmp_path / "node-local" / "imagenet"
    argv = [f"data.train={missing}", f"data.val={missing}"]
    code, _, err = launch("slurm", tmp_path, capsys, *argv)
    assert code == 2 and str(missing) in err
    code, out, err = launch("slurm", tmp_path, capsys, *argv, extra=("--no-data-check",))
    assert code == 0 and out.startswith("#!/bin/bash") and "data not checked here (--no-data-check)" in err, err
