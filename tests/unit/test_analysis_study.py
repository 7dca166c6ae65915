"""`vimoe study layers|plot`: the sweep's points and command lines, the Slurm array task script, running points one
after the other (skipping finished ones, going on after a failure) and Figure 2 from the runs' eval.json."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import FAKE_TRAINER_HEAD

from vimoe_dist.analysis.study import Point, collect_results, parse_L, sweep_points, task_script, train_args
from vimoe_dist.cli import build_parser, main
from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "digits.yaml")

# Stands in for `python` in `--launch` (tests/support.py) and writes what a finished run leaves (config.yaml,
# eval.json); real training runs take minutes here (the chain test trains for real). That the same command line
# parses as a real config: test_points_and_commands.
FAKE_TRAINER = (
    FAKE_TRAINER_HEAD
    + """
if L == 4 and not moe["shared_expert"]:
    sys.exit(3)  # a failing point
(out / "config.yaml").write_text(yaml.safe_dump(cfg))
(out / "eval.json").write_text(json.dumps({"top1": top1, "top5": 1.0, "loss": 1.0, "images": 360}))
with open(out.parent / "calls.txt", "a") as f:
    f.write(out.name + "\\n")
"""
)


def test_points_and_commands() -> None:
    assert parse_L("4, 0,2") == [0, 2, 4]
    for bad in ("a,b", "", "-1"):
        with pytest.raises(UserError, match="--L"):
            parse_L(bad)
    points = sweep_points([0, 2], [True, False])
    assert [p.name for p in points] == ["L0-dense", "L2-shared", "L2-noshared"]
    args = train_args(CONFIG, ["train.steps=5", "run.out_dir=/elsewhere"], Point(2, False), Path("/s"))
    assert args[:5] == ["-m", "vimoe_dist", "train", "--config", CONFIG]
    # the sweep's keys come last and win; the whole line parses as `vimoe train` arguments and as a config
    parsed = build_parser().parse_args(args[2:])
    cfg = load_config(parsed.config, parsed.overrides)
    assert (cfg.model.moe.layers, cfg.model.moe.shared_expert) == ("last-2", False)
    assert (cfg.run.out_dir, cfg.train.steps) == ("/s/L2-noshared", 5)


def test_slurm_task_script_picks_the_point_by_array_index(tmp_path) -> None:
    points = sweep_points([0, 1], [True])
    commands = [["echo", "run", p.name, "with spaces"] for p in points]
    script = tmp_path / "task.sh"
    script.write_text(task_script(points, commands, tmp_path))
    run = lambda i: subprocess.run(  # noqa: E731
        ["bash", str(script)],
        env={"SLURM_ARRAY_TASK_ID": str(i), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert run(1).stdout == "run L1-shared with spaces\n"
    assert run(7).returncode == 2
    (tmp_path / "L1-shared").mkdir()
    (tmp_path / "L1-shared" / "eval.json").write_text("{}")
    done = run(1)
    assert done.returncode == 0 and done.stdout == ""  # a finished point is not run again


def test_sequential_sweep_skips_finished_goes_on_after_failure_and_plots(tmp_path, capsys) -> None:
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    out = tmp_path / "study"
    argv = ["study", "layers", "--config", CONFIG, "--L", "0,2,4", "--both", "--out", str(out)]
    argv += ["--launch", f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}", "train.steps=3"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1  # L4-noshared failed; the others ran
    assert "failed points: L4-noshared" in capsys.readouterr().err
    calls = (out / "calls.txt").read_text().split()
    assert calls == ["L0-dense", "L2-shared", "L2-noshared", "L4-shared"]
    results = json.loads((out / "study.json").read_text())
    got = {(r["L"], r["variant"]): r["top1"] for r in results}
    assert got == pytest.approx(
        {(0, "dense"): 0.5, (2, "shared expert"): 0.6, (2, "no shared expert"): 0.4, (4, "shared expert"): 0.7}
    )
    png = (out / "top1_vs_L.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # a second run only retries the failed point
    with pytest.raises(SystemExit):
        main(argv)
    assert (out / "calls.txt").read_text().split() == calls
    assert yaml.safe_load((out / "L2-noshared" / "config.yaml").read_text())["train"]["steps"] == 3


def test_dry_run_and_plot_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "layers", "--config", CONFIG, "--L", "0,2", "--out", str(tmp_path), "--dry-run"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "model.moe.layers=last-2 model.moe.shared_expert=true" in out
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "layers", "--config", CONFIG, "--L", "0,9", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "backbone has 6" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "plot", str(tmp_path)])
    assert exit_info.value.code == 2
    assert collect_results(tmp_path) == []
