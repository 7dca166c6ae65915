"""`vimoe study layers`: the ViMoE sweep over the number of MoE blocks, and its Figure 2.

ViMoE (Han et al. 2024, Sec. 3.2, Fig. 2) trains the same model with MoE FFNs in the last L blocks for several L,
with and without the shared expert, and plots top-1 against L: without the shared expert accuracy swings with L;
with it the curve is stable. Each point here is one ordinary training run,

    python -m vimoe_dist train --config FILE [overrides] model.moe.layers=last-L model.moe.shared_expert=B \
        run.out_dir=OUT/L{L}-{shared|noshared}

(L = 0 is the dense baseline, OUT/L0-dense, shared by both curves), run one after the other here or as one Slurm
job array. A point whose `eval.json` exists is not run again, and an interrupted one resumes (run.resume=auto), so
the command can simply be repeated. `vimoe study plot OUT` draws the figure from whatever runs have finished.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from vimoe_dist.errors import UserError

VARIANT_NAMES = {True: "shared", False: "noshared"}


@dataclass(frozen=True)
class Point:
    L: int
    shared: bool

    @property
    def name(self) -> str:
        return "L0-dense" if self.L == 0 else f"L{self.L}-{VARIANT_NAMES[self.shared]}"


def parse_L(text: str) -> list[int]:
    """`0,2,4,6` -> [0, 2, 4, 6]."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--L: {text!r} is not a comma-separated list of block counts") from None
    if not values or values[0] < 0:
        raise UserError(f"--L: {text!r}: give one or more block counts >= 0")
    return values


def sweep_points(L_values: list[int], variants: list[bool]) -> list[Point]:
    """One point per (L, variant); the dense L = 0 once."""
    points = []
    for L in L_values:
        if L == 0:
            points.append(Point(0, variants[0]))
        else:
            points.extend(Point(L, shared) for shared in variants)
    return points


def train_args(config: str, overrides: list[str], point: Point, out: Path) -> list[str]:
    """`train --config ...` for one point; the sweep's keys come last so they win over user overrides."""
    return [
        "-m",
        "vimoe_dist",
        "train",
        "--config",
        config,
        *overrides,
        f"model.moe.layers=last-{point.L}",
        f"model.moe.shared_expert={'true' if point.shared else 'false'}",
        f"run.out_dir={out / point.name}",
    ]


def run_study(args: argparse.Namespace) -> int:
    """The `vimoe study layers` command."""
    from vimoe_dist.config import load_config

    L_values = parse_L(args.L)
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config  # or a shipped name
    cfg = load_config(config, list(args.overrides))  # a typo fails here, not in the first run
    depth = _depth(cfg)
    if depth is not None and L_values[-1] > depth:
        raise UserError(f"--L: {L_values[-1]} MoE blocks but the backbone has {depth}")
    variants = [True, False] if args.both else [not args.no_shared_expert]
    out = Path(args.out).resolve()
    points = sweep_points(L_values, variants)
    commands = [[*shlex.split(args.launch), *train_args(config, list(args.overrides), p, out)] for p in points]
    if args.slurm:
        return _submit_array(args, points, commands, out)
    from vimoe_dist.metrics.progress import track

    failed = []
    # plain lines even on a terminal: the runs draw their own progress on it
    progress = {"total": len(points), "unit": "point", "bar": False, "every_s": 0, "enabled": not args.dry_run}
    for point, cmd in track(zip(points, commands), "study", **progress):
        if (out / point.name / "eval.json").is_file():
            print(f"study: {point.name} done already ({out / point.name / 'eval.json'})", flush=True)
            continue
        print(f"study: {point.name}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        if subprocess.run(cmd).returncode != 0:
            failed.append(point.name)
            print(f"study: {point.name} failed; going on with the others", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    path, results = plot_study_dir(out)
    for r in results:
        print(f"L={r['L']:<3} {r['variant']:<10} top-1 {r['top1']:.4f}")
    print(f"wrote {path} and {out / 'study.json'}", flush=True)
    if failed:
        print(f"study: failed points: {', '.join(failed)} (their logs are above; rerun to retry)", file=sys.stderr)
        return 1
    return 0


def _depth(cfg) -> int | None:
    """The backbone's depth, from backbone_kwargs or by building the (small) dense model skeleton."""
    if "depth" in cfg.model.backbone_kwargs:
        return int(cfg.model.backbone_kwargs["depth"])
    try:
        from vimoe_dist.model import build_dense

        return len(build_dense(cfg.model).blocks)
    except Exception:  # an unknown backbone fails the first run with its own message
        return None


def task_script(points: list[Point], commands: list[list[str]], out: Path) -> str:
    """The script each array task runs: picks its point by SLURM_ARRAY_TASK_ID; a finished point exits at once."""
    lines = [
        "#!/bin/bash",
        "# one point of `vimoe study layers`, picked by the Slurm array index (vimoe_dist/analysis/study.py)",
        "set -euo pipefail",
        'case "${SLURM_ARRAY_TASK_ID:?not a Slurm array task}" in',
    ]
    for i, (point, cmd) in enumerate(zip(points, commands)):
        done = shlex.quote(str(out / point.name / "eval.json"))
        lines.append(f"  {i}) [ -f {done} ] && exec true; exec {shlex.join(cmd)} ;;")
    lines += ['  *) echo "no study point $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


def submit_array(
    args: argparse.Namespace, points: list, commands: list[list[str]], out: Path, job_name: str
) -> tuple[int, int | None]:
    """One Slurm job array, a task per point (anything with a `.name`; its run directory is `out / name`), rendered
    from the shipped template and submitted with `launch.submit`; `vimoe study layers` and `vimoe study routers`
    both go through here. With `--dry-run` it prints the task script, the batch script and the sbatch command.
    Returns (sbatch's exit code, the job id or None when nothing was submitted)."""
    from vimoe_dist.launch.resources import load_template
    from vimoe_dist.launch.sbatch import SlurmJob, render_sbatch
    from vimoe_dist.launch.submit import sbatch_command, submit

    slurm_dir = out / "slurm"
    tasks = slurm_dir / "study_task.sh"
    job = SlurmJob(
        command=["bash", str(tasks)],
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time=args.time,
        job_name=job_name,
        log_dir=str(slurm_dir),
        log_name="%x-%A_%a.out",  # one log per array task (%A job, %a index)
        workdir=str(Path.cwd()),
        extra_sbatch=[f"array=0-{len(points) - 1}", *args.sbatch],
    )
    script = render_sbatch(job, load_template())
    script_path = slurm_dir / "study.sbatch"
    if args.dry_run:
        print(task_script(points, commands, out), end="")
        print(script, end="")
        print(shlex.join(sbatch_command(script_path, wait=args.wait)))
        return 0, None
    slurm_dir.mkdir(parents=True, exist_ok=True)
    tasks.write_text(task_script(points, commands, out))
    result = submit(script, script_path, wait=args.wait)
    return result.returncode, result.job_id if result.returncode == 0 else None


def _submit_array(args: argparse.Namespace, points: list[Point], commands: list[list[str]], out: Path) -> int:
    code, job_id = submit_array(args, points, commands, out, "vimoe-study")
    if job_id is None:
        return code
    slurm_dir = out / "slurm"
    print(
        f"submitted array job {job_id}: {len(points)} points ({', '.join(p.name for p in points)}), logs in {slurm_dir}"
    )
    if args.wait:
        path, _ = plot_study_dir(out)
        print(f"wrote {path}")
    else:
        print(f"when it has finished: vimoe study plot {out}")
    return 0


def collect_results(study_dir: str | Path) -> list[dict]:
    """One record per finished run under `study_dir`: L, variant, top-1, from its config.yaml and eval.json."""
    results = []
    for eval_path in sorted(Path(study_dir).glob("*/eval.json")):
        run = eval_path.parent
        try:
            ev = json.loads(eval_path.read_text())
            cfg = yaml.safe_load((run / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError) as e:
            print(f"study: skipping {run}: {e}", file=sys.stderr)
            continue
        moe = cfg["model"]["moe"]
        layers = moe["layers"]
        L = int(layers[5:]) if isinstance(layers, str) else len(layers)
        variant = "dense" if L == 0 else ("shared expert" if moe.get("shared_expert") else "no shared expert")
        results.append({"L": L, "variant": variant, "top1": float(ev["top1"]), "run": str(run)})
    return sorted(results, key=lambda r: (r["variant"], r["L"]))


def plot_study_dir(study_dir: str | Path) -> tuple[Path, list[dict]]:
    """Writes STUDY/study.json and STUDY/top1_vs_L.png; returns the figure's path and the results."""
    study_dir = Path(study_dir)
    results = collect_results(study_dir)
    if not results:
        raise UserError(f"{study_dir}: no finished run (no */eval.json)")
    (study_dir / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    return plot_top1_vs_L(results, study_dir / "top1_vs_L.png"), results


def plot_top1_vs_L(results: list[dict], path: str | Path) -> Path:
    """ViMoE Fig. 2: top-1 (%) against the number of MoE blocks L, one curve per variant; the dense run is the L = 0
    point of every curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dense = [r for r in results if r["variant"] == "dense"]
    curves = sorted({r["variant"] for r in results} - {"dense"}) or ["dense"]
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    styles = {"shared expert": ("tab:red", "o"), "no shared expert": ("tab:blue", "s"), "dense": ("tab:gray", "D")}
    for variant in curves:
        pts = sorted([*dense, *(r for r in results if r["variant"] == variant)], key=lambda r: r["L"])
        colour, marker = styles[variant]
        ax.plot([r["L"] for r in pts], [100 * r["top1"] for r in pts], marker=marker, color=colour, label=variant)
    ax.set_xlabel("MoE blocks L (MoE in the last L blocks)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(sorted({r["L"] for r in results}))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Top-1 against the number of MoE layers (ViMoE Fig. 2)")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
