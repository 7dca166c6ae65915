"""`vimoe study routers`: the compute matching (checked against what the routers then compute), bad input as one
line and exit 2, the report's numbers and findings, the Slurm array, bounded local runs, and (slow) the whole
command on a tiny run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import unset_env

from vimoe_dist.analysis.router_report import findings, summarise, table_lines, write_report
from vimoe_dist.analysis.study_routers import (
    STUDY_ROUTERS,
    Run,
    _Runner,
    match_compute,
    parse_routers,
)
from vimoe_dist.cli import main
from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError
from vimoe_dist.model.moe.routers import build_router

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "router_study.yaml")
# the matching tests' shape (the shipped config's is 16 experts in groups of one image): 4 experts, top-1, groups of
# 8 images of 16 tokens, so that each router's buffers hold several rows
SHAPE = ["model.moe.num_experts=4", "model.moe.top_k=1", "model.moe.group_size=8"]


def test_parse_routers() -> None:
    assert parse_routers(None) == list(STUDY_ROUTERS)
    assert parse_routers("soft, tc-softmax") == ["tc-softmax", "soft"]  # the paper's order
    with pytest.raises(UserError, match="--routers: unknown router 'tc-nope'"):
        parse_routers("tc-softmax,tc-nope")


@pytest.mark.parametrize(("top_k", "routing"), [(1, "token"), (2, "token"), (1, "image"), (4, "image")])
def test_matching_gives_every_router_the_rows_of_token_choice(top_k: int, routing: str) -> None:
    # E = 4 experts, groups of 8 images of N = 16 tokens; token choice top-k asks for k N expert rows per image.
    # Each matched router, built from the overrides and run on its routing groups, must offer exactly that: E C =
    # k U buffer slots per group of U units (token choice fills at most that many), k U rows for expert choice
    # (always full), E S = k U slots for Soft MoE, whose groups under token routing are single images (U = N).
    overrides = [*SHAPE, f"model.moe.top_k={top_k}", f"model.moe.routing={routing}"]
    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    for m in match_compute(cfg, list(STUDY_ROUTERS), 16):
        moe = load_config(CONFIG, [*overrides, *m.overrides]).model.moe
        units = moe.group_size * (16 if routing == "token" else 1)
        rows_per_unit = 1 if routing == "token" else 16
        if m.router == "soft":
            options = {"slots_per_expert": moe.slots_per_expert}
            assert moe.group_size == (1 if routing == "token" else 8)
        else:
            options = {"top_k": moe.top_k, "capacity_factor": moe.capacity_factor}
        routing_ = build_router(m.router, 8, 4, **options).train()(torch.randn(3, units, 8))
        assert routing_.num_experts * routing_.capacity == top_k * units, m.router
        rows_per_image = routing_.units_per_expert().sum().item() * rows_per_unit / (3 * moe.group_size)
        if m.router.startswith("tc-"):
            assert rows_per_image <= top_k * 16
        else:
            assert rows_per_image == top_k * 16, m.router


def test_matching_that_cannot_be_met() -> None:
    cfg = load_config(CONFIG, [*SHAPE, "model.moe.num_experts=3"])  # 8 x 16 = 128 units per group, not a multiple of 3
    with pytest.raises(UserError, match="matched compute cannot be met: top_k 1 x 128 units per group = 128 expert"):
        match_compute(cfg, ["tc-softmax", "soft"], 16)
    cfg = load_config(
        CONFIG, [*SHAPE, "model.moe.num_experts=8"]
    )  # 128 / 8 = 16 slots; Soft MoE 16 tokens / 8 = 2: fine
    assert len(match_compute(cfg, ["tc-softmax", "soft"], 16)) == 2
    # 12 tokens per image: 96 / 8 = 12 slots for the sparse routers, but Soft MoE's 12 / 8 = 1.5 per expert
    with pytest.raises(UserError, match="top_k 1 x 12 units per Soft MoE group = 12 expert rows"):
        match_compute(cfg, ["tc-softmax", "soft"], 12)
    cfg = load_config(CONFIG, [*SHAPE, "model.moe.min_capacity=40"])  # 128 / 4 = 32 slots per expert
    with pytest.raises(UserError, match="min_capacity=40 exceeds the 32 slots"):
        match_compute(cfg, ["ec-softmax"], 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routers", "tc-softmax,tc-nope"], "--routers: unknown router 'tc-nope'"),
        (["model.moe.num_experts=3"], "matched compute cannot be met"),
        (["model.moe.noise_std=-1"], "model.moe.noise_std: must be a finite number >= 0"),
        (["model.moe.load_loss=-0.1"], "model.moe.load_loss: must be a finite number >= 0"),
        (["model.moe.z_loss=.inf"], "model.moe.z_loss: must be a finite number >= 0"),
        (["--seeds", "0"], "--seeds: must be >= 1"),
        (["--jobs", "0"], "--jobs: must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["study", "routers", "--config", CONFIG, "--out", str(tmp_path), "--dry-run", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def _result(router: str, seed: int, top1: float) -> dict:
    return {"router": router, "seed": seed, "top1": top1, "top5": 99.0, "train_loss": 1.0, "images_per_sec": 100.0,
            "dropped": 0.0, "load": 1.0, "loss_curve": [(1, 2.0), (2, 1.0)]}  # fmt: skip


def test_summary_and_findings_by_hand() -> None:
    # seeds 0, 1, 2 - tc-softmax 70, 72, 71; ec-softmax 75, 77, 73; soft 73, 76, 71
    top1 = {"tc-softmax": (70.0, 72.0, 71.0), "ec-softmax": (75.0, 77.0, 73.0), "soft": (73.0, 76.0, 71.0)}
    results = [_result(r, s, v) for r, values in top1.items() for s, v in enumerate(values)]
    summary = summarise(results)
    assert list(summary) == ["tc-softmax", "ec-softmax", "soft"]  # the paper's order
    assert summary["tc-softmax"]["top1"] == pytest.approx((71.0, 1.0))  # sample sd of 70, 72, 71
    assert table_lines(summary)[2].startswith("| `tc-softmax` | 3 | 71.0 ± 1.0 | 99.0 ± 0.0 |")
    (i, ii, iii) = findings(summary, results)
    assert i == "(i) every router trains: top-1 from 71.0% (tc-softmax) to 75.0% (ec-softmax)."
    # (ii) per-seed gaps ec - tc: 5, 5, 2 -> mean 4, sd sqrt(((1 + 1 + 4) / 2)) = sqrt(3), 2 se = 2 sqrt(3)/sqrt(3) = 2
    assert ii.startswith("(ii) Expert Choice over Token Choice held: expert choice averages 75.0% top-1, token ")
    assert "(gap +4.0 points, 2 standard errors of the per-seed gap over 3 seeds 2.0); 1 of 1 expert/token" in ii
    # (iii) soft - ec-softmax per seed: -2, -1, -2 -> mean -5/3 = -1.7, sd 0.577, 2 se = 0.67: above, reversed
    assert iii.startswith("(iii) Soft MoE over sparse MoE at matched compute reversed: soft 73.3% top-1 against the")
    assert "ec-softmax, 75.0% (gap -1.7 points, 2 standard errors of the per-seed gap over 3 seeds 0.7)" in iii
    assert iii.endswith("soft beats 1 of 2 sparse routers.")
    # seed 2 alone of soft: 71 - 73 = -2 with no spread; within the noise: not shown
    assert "not shown: soft" in findings(summary, [r for r in results if r["seed"] == 2])[2]
    close = [_result("tc-softmax", s, v) for s, v in enumerate((70.0, 72.0))] + [
        _result("ec-softmax", s, v) for s, v in enumerate((71.0, 72.5))
    ]  # gaps 1, 0.5: mean 0.75, sd 0.354, 2 se 0.5 -> above; gaps 1, -0.5 would not be
    assert findings(summarise(close), close)[1].startswith("(ii) Expert Choice over Token Choice held")
    close[3]["top1"] = 71.5  # gaps 1, -0.5: mean 0.25, sd 1.06, 2 se 1.5
    assert (
        "not shown" in findings(summarise(close), close)[1]
        and "within the seed noise" in findings(summarise(close), close)[1]
    )
    # a subset without expert choice cannot test (ii)
    one = [_result("tc-softmax", 0, 70.0), _result("soft", 0, 73.0)]
    assert "not tested" in findings(summarise(one), one)[1] and "one common seed" in findings(summarise(one), one)[2]


def test_slurm_dry_run_prints_one_array_task_per_run(tmp_path, capsys) -> None:
    argv = ["study", "routers", "--config", CONFIG, "--out", str(tmp_path), "--slurm", "--dry-run"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--routers", "tc-softmax,soft", "--seeds", "2", "--partition", "gpu"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "#SBATCH --array=0-3" in out and "#SBATCH --partition=gpu" in out
    for i, run in enumerate([Run("tc-softmax", 0), Run("soft", 0), Run("tc-softmax", 1), Run("soft", 1)]):
        assert f"  {i}) [ -f {tmp_path / run.name / 'eval.json'} ]" in out
    assert "model.moe.slots_per_expert=1 model.moe.noise_std=0" in out and "run.seed=1" in out  # 16 / 16 experts


def test_local_run_is_bounded_by_its_timeout(tmp_path) -> None:
    # the run and the child it started are both ended when the timeout passes
    pid_file = tmp_path / "child.pid"
    code = "import subprocess, sys, time; "
    code += (
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); open({str(pid_file)!r}, 'w')"
    )
    code += ".write(str(p.pid)); time.sleep(120)"
    t0 = time.monotonic()
    assert _Runner(timeout_s=2).run([sys.executable, "-c", code]) is None
    assert time.monotonic() - t0 < 60
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_cancel_ends_every_run_and_starts_no_other(tmp_path) -> None:
    # Ctrl-C during `--jobs 2`: the runs in flight are ended at once (no 30 s grace, no orphan) and none starts after
    from concurrent.futures import ThreadPoolExecutor

    runner = _Runner(timeout_s=120)
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(runner.run, sleeper, tmp_path / f"run{i}.log") for i in range(2)]
        deadline = time.monotonic() + 30
        while len(runner.live) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [p.pid for p in runner.live]
        t0 = time.monotonic()
        runner.cancel()
        assert [f.result(timeout=30) for f in futures] == [-9, -9]
    assert time.monotonic() - t0 < 10 and len(pids) == 2
    assert runner.run(sleeper) is None  # cancelled: nothing new starts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run0.log", "run1.log"]


@pytest.mark.slow
def test_study_end_to_end_at_a_tiny_size(tmp_path, capsys, monkeypatch) -> None:
    # 2 routers x 2 seeds x 2 steps of a tiny model on a tiny families set: the real trainer, the real report
    data = tmp_path / "data"
    main_ok = ["data", "families", "--out", str(data), "--families", "2", "--per-family", "2", "--images", "64",
               "--object", "12"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([*main_ok, "--val-images", "16", "--workers", "1", "--max-count", "32"])
    assert e.value.code == 0
    assert json.loads((data / "train.json").read_text())["source"].endswith(",object=12")
    out = tmp_path / "study"
    tiny = [f"data.train={data}/train-*.tar", f"data.val={data}/val-*.tar", "model.num_classes=4", "train.steps=2",
            "train.global_batch_size=16", "train.warmup_steps=1", "train.log_every=1", "data.num_workers=0",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, class_token: false}",
            *SHAPE]  # fmt: skip
    argv = ["study", "routers", "--config", CONFIG, "--out", str(out), "--routers", "tc-softmax,soft", "--seeds", "2"]
    unset_env(monkeypatch, "OMP_NUM_THREADS")  # the study sets it for its runs: cores / --jobs
    with pytest.raises(SystemExit) as e:  # two runs at a time, each writing its own log
        main([*argv, "--timeout-s", "600", "--jobs", "2", *tiny])
    assert e.value.code == 0, capsys.readouterr().err[-3000:]
    captured = capsys.readouterr()
    printed = captured.out
    assert "study: 4/4 runs in " in captured.out + captured.err  # progress, one plain line per run
    assert "study:   soft         groups of one image (as its authors), slots_per_expert 4" in printed
    assert "study: 2 runs at once, OMP_NUM_THREADS=" in printed
    report = json.loads((out / "routers.json").read_text())
    assert [(r["router"], r["seed"]) for r in report["runs"]] == [("soft", 0), ("soft", 1), ("tc-softmax", 0),
                                                                   ("tc-softmax", 1)]  # fmt: skip
    for run in report["runs"]:
        assert 0 <= run["dropped"] <= 100 and run["load"] >= 1.0 and run["images_per_sec"] > 0
    assert (out / "routers.png").stat().st_size > 0
    for run in ("soft/seed0", "tc-softmax/seed1"):
        assert "INFO start: device cpu" in (out / f"{run}.log").read_text()
    assert "(iii) Soft MoE over sparse MoE" in (out / "routers.md").read_text()
    # a second call runs nothing again and rewrites the same report
    with pytest.raises(SystemExit) as e:
        main([*argv, *tiny])
    assert e.value.code == 0 and capsys.readouterr().out.count("done already") == 4
    assert write_report(out).lines == (out / "routers.md").read_text().splitlines()


def test_families_task_is_balanced_and_names_its_families(tmp_path) -> None:
    from vimoe_dist.data.families import class_names, write_families

    manifests = write_families(tmp_path, num_families=3, per_family=2, num_images=12, num_val=6, progress=False)
    assert manifests["train"].label_counts == [2] * 6 and manifests["val"].label_counts == [1] * 6
    assert class_names(3, 2) == ["gratings0", "gratings1", "rings0", "rings1", "blobs0", "blobs1"]
    with pytest.raises(UserError, match="--families: must be between 1 and 6"):
        write_families(tmp_path, num_families=7)
    with pytest.raises(UserError, match=r"--object: the window must be 0 \(whole image\) or 4 to --size 16 px, got 20"):
        write_families(tmp_path, object_size=20)


def test_families_object_window_holds_the_pattern_and_nothing_else() -> None:
    # --object 8 on 24 px: outside the 8 x 8 window the image is the plain background (plus pixel noise), inside it
    # varies with the pattern; the window's place changes from image to image
    from vimoe_dist.data.families import family_image

    corners = set()
    for i in range(8):
        img = family_image(i % 16, 4, 24, 0.0, np.random.default_rng(i), obj=8).astype(float).mean(axis=2)
        rows, cols = np.nonzero(np.abs(img - np.median(img)) > 1)
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8, i
        corners.add((rows.min() // 4, cols.min() // 4))
    assert len(corners) > 1
