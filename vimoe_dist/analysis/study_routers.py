"""`vimoe study routers`: the head-to-head of "Routers in Vision Mixture of Experts" (Liu et al., TMLR 2024) as a
command: every router of the zoo trained at matched compute, with several seeds, then a table, a plot and one
sentence per finding of the paper on whether its ranking held on this data.

Matched compute: with E experts, top_k k and U units per routing group, token choice top-k asks for k U expert
rows per group (k N per image of N tokens). Every router gets exactly that budget: token choice a capacity factor
of 1 (C = k U / E slots per expert, so E C = k U; a choice that finds its expert full is dropped and not
computed), expert choice the same C (its buffers are always full: k U rows), Soft MoE k U / E slots per expert
(E S = k U slots, each a mix of the group's units; under token routing in groups of one image, as its authors
route, so k N / E slots). The budget must split evenly over the E experts, or it would differ by the rounding.

Each run is an ordinary training run,

    python -m vimoe_dist train --config FILE [overrides] model.moe.router=R ... run.seed=S run.out_dir=OUT/R/seedS

run one after the other here (each bounded by --timeout-s) or as one Slurm job array as `vimoe study layers` does.
A run whose `eval.json` exists is not run again and an interrupted one resumes, so the command can be repeated;
`--report-only` writes the table and plot from whatever runs have finished.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vimoe_dist.config import ROUTER_NAMES, Config, router_option_resets
from vimoe_dist.errors import UserError

# the paper's order: token choice, expert choice, soft
STUDY_ROUTERS = ("tc-softmax", "tc-sinkhorn", "ec-softmax", "ec-sinkhorn", "ec-sparse", "soft")
BALANCING_LOSSES = ("importance_loss", "load_loss", "switch_loss")


@dataclass(frozen=True)
class Matching:
    """The budget of one router: the overrides that give it k U expert rows per group, and why."""

    router: str
    overrides: tuple[str, ...]
    explain: str


@dataclass(frozen=True)
class Run:
    router: str
    seed: int

    @property
    def name(self) -> str:  # a path under --out; also what `study.task_script` reads
        return f"{self.router}/seed{self.seed}"


def register(studies: argparse._SubParsersAction, fmt: type) -> None:
    """`vimoe study routers`, registered next to `vimoe study layers` (analysis/cli.py)."""
    from vimoe_dist.cli import add_config_args

    ro = studies.add_parser(
        "routers",
        help="the Routers paper's head-to-head: every router at matched compute, several seeds, table and plot",
        description=__doc__,
        formatter_class=fmt,
    )
    ro.add_argument("--routers", metavar="R1,R2,...", help=f"default: all ({', '.join(STUDY_ROUTERS)})")
    ro.add_argument("--seeds", type=int, default=3, help="runs per router, seeds run.seed, +1, ... (default 3)")
    ro.add_argument("--out", default="runs/router_study", metavar="DIR", help="ROUTER/seedS run directories + report")
    ro.add_argument(
        "--launch",
        default=sys.executable,
        metavar="PREFIX",
        help="what runs `-m vimoe_dist train ...` (default: python)",
    )
    ro.add_argument("--timeout-s", type=float, default=3600.0, help="limit per local run (default 3600)")
    ro.add_argument("--report-only", action="store_true", help="only write the table and plot of the finished runs")
    ro.add_argument("--dry-run", action="store_true", help="print the matching and the commands (or the sbatch script)")
    sl = ro.add_argument_group("Slurm array (instead of running one after the other here)")
    sl.add_argument("--slurm", action="store_true", help="submit the runs as one Slurm job array")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=0)
    sl.add_argument("--ntasks-per-node", type=int)
    sl.add_argument("--cpus-per-task", type=int)
    sl.add_argument("--partition")
    sl.add_argument("--time", help="time limit per run (Slurm format)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION[=VALUE]", help="extra #SBATCH line")
    sl.add_argument("--wait", action="store_true", help="wait for the array to end, then write the report")
    add_config_args(ro, required=False)
    ro.set_defaults(func=run_study_routers)


def parse_routers(text: str | None) -> list[str]:
    """`tc-softmax,soft` -> the routers in the paper's order; None: all of them."""
    if text is None:
        return list(STUDY_ROUTERS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ROUTER_NAMES]
    if unknown or not names:
        raise UserError(f"--routers: unknown router {unknown[0]!r}; known: {', '.join(STUDY_ROUTERS)}" if unknown else
                        f"--routers: {text!r} names no router; known: {', '.join(STUDY_ROUTERS)}")  # fmt: skip
    return [r for r in STUDY_ROUTERS if r in names]


DEFAULT_CONFIG = "router_study"  # the shipped config of the families task (vimoe_dist/configs/router_study.yaml)


def tokens_per_image(cfg: Config) -> int:
    """N: the rows an image brings to an MoE block (the backbone's patches plus its prefix tokens)."""
    from vimoe_dist.model import build_dense

    vit = build_dense(cfg.model)
    return vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1)


def match_compute(cfg: Config, routers: list[str], tokens: int) -> list[Matching]:
    """The overrides that give each router the k N expert rows per image of token choice top-k (N tokens per image).

    Soft MoE under token routing gets routing groups of one image, as its authors route each image's tokens on
    their own (vmoe's SoftRouter: "g = number of groups (typically batch size)"): a slot mixing the tokens of several
    images would blend images and make a prediction depend on the others in its group.
    """
    moe = cfg.model.moe
    k, E, g = moe.top_k, moe.num_experts, moe.group_size
    units = g * tokens if moe.routing == "token" else g
    soft_units = tokens if moe.routing == "token" else g
    checks = [("units per group", units)] if any(r != "soft" for r in routers) else []
    checks += [("units per Soft MoE group", soft_units)] if "soft" in routers else []
    for what, n in checks:
        if (k * n) % E:
            raise UserError(
                f"matched compute cannot be met: top_k {k} x {n} {what} = {k * n} expert rows do not split evenly "
                f"over model.moe.num_experts={E}; change model.moe.group_size, top_k, num_experts or the image size"
            )
    slots, soft_slots = k * units // E, k * soft_units // E
    if moe.min_capacity > slots:
        raise UserError(
            f"matched compute cannot be met: model.moe.min_capacity={moe.min_capacity} exceeds the {slots} slots per "
            f"expert of the matched budget; lower it"
        )
    off = tuple(f"model.moe.{key}=0" for key in BALANCING_LOSSES)
    kept = ", ".join(f"{key} {getattr(moe, key):g}" for key in (*BALANCING_LOSSES, "z_loss") if getattr(moe, key))
    noise = f"noise_std {moe.noise_std:g} (relative)" if moe.noise_std else "no noise"
    out = []
    for r in routers:
        base = (f"model.moe.router={r}", f"model.moe.top_k={k}")
        if r.startswith("tc-"):
            ov = (*base, "model.moe.capacity_factor=1.0", "model.moe.eval_capacity_factor=1.0")
            why = f"capacity_factor 1: C = {k} x {units} / {E} = {slots} slots per expert, at most {k * units} rows"
            why += f" per group (dropped choices are not computed); {noise}; {kept or 'no auxiliary loss'}"
        elif r.startswith("ec-"):
            ov = (*base, "model.moe.capacity_factor=1.0", "model.moe.eval_capacity_factor=1.0", *off)
            why = f"capacity_factor 1: C = {slots} slots per expert, always full: {k * units} rows per group; {noise}; "
            why += "no balancing loss (as its authors train it)"
        else:
            ov = ("model.moe.router=soft", f"model.moe.slots_per_expert={soft_slots}", "model.moe.noise_std=0", *off)
            if moe.routing == "token":
                ov = (*ov, "model.moe.group_size=1")
                why = f"groups of one image (as its authors), slots_per_expert {soft_slots}: {E} x {soft_slots} = "
                why += f"{k * tokens} slots per image of {tokens} tokens"
            else:
                why = f"slots_per_expert {soft_slots}: {E} x {soft_slots} = {k * units} slots per group"
            why += "; no noise, no balancing loss (as its authors train it)"
        # the base config's options for another router (top_k for soft, ...) go back to their defaults
        resets = tuple(
            o for o in router_option_resets(r, moe) if not any(o.split("=")[0] == x.split("=")[0] for x in ov)
        )
        out.append(Matching(r, (*resets, *ov), why))
    return out


def train_command(launch: str, config: str, overrides: list[str], matching: Matching, run: Run, out: Path) -> list[str]:
    """One run's command line; the study's keys come last so they win over the user's overrides."""
    return [
        *shlex.split(launch),
        *("-m", "vimoe_dist", "train", "--config", config),
        *overrides,
        *matching.overrides,
        f"run.seed={run.seed}",
        f"run.out_dir={out / run.name}",
    ]


def run_study_routers(args: argparse.Namespace) -> int:
    """The `vimoe study routers` command."""
    from vimoe_dist.analysis.router_report import write_report
    from vimoe_dist.config import load_config

    out = Path(args.out).resolve()
    if args.report_only:
        return _report(write_report(out))
    spec = args.config or DEFAULT_CONFIG
    config = str(Path(spec).resolve()) if Path(spec).is_file() else spec  # or a shipped name, passed on as it is
    routers = parse_routers(args.routers)
    if args.seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {args.seeds}")
    if args.timeout_s <= 0:
        raise UserError(f"--timeout-s: must be > 0, got {args.timeout_s}")
    cfg = load_config(config, list(args.overrides))  # a typo fails here, not in the first run
    tokens = tokens_per_image(cfg)
    matchings = match_compute(cfg, routers, tokens)
    moe = cfg.model.moe
    print(f"study: matched compute: {moe.num_experts} experts, top_k {moe.top_k}, {tokens} tokens per image, "
          f"{moe.routing} routing in groups of {moe.group_size} images: {moe.top_k * tokens} expert rows per image "
          "for every router", flush=True)  # fmt: skip
    for m in matchings:
        print(f"study:   {m.router:<12} {m.explain}")
    if not args.slurm and not args.dry_run:
        _check_data(cfg)
    # seed-major: on a shared machine a change of load then spreads over every router instead of hitting one
    runs = [Run(m.router, cfg.run.seed + i) for i in range(args.seeds) for m in matchings]
    by_router = {m.router: m for m in matchings}
    commands = [train_command(args.launch, config, list(args.overrides), by_router[r.router], r, out) for r in runs]
    if args.slurm:
        return _submit(args, runs, commands, out)
    from vimoe_dist.metrics.progress import track

    failed = []
    # plain lines even on a terminal (the runs draw their own progress there): `study: i/N run`, elapsed and ETA
    progress = {"total": len(runs), "unit": "run", "bar": False, "every_s": 0, "enabled": not args.dry_run}
    for run, cmd in track(zip(runs, commands), "study", **progress):
        if (out / run.name / "eval.json").is_file():
            print(f"study: {run.name} done already", flush=True)
            continue
        print(f"study: {run.name}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        code = _run_bounded(cmd, args.timeout_s)
        if code != 0:
            failed.append(run.name)
            why = f"timed out after {args.timeout_s:g} s" if code is None else f"exited with {code}"
            print(f"study: {run.name} {why}; going on with the others", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    _report(write_report(out))
    if failed:
        print(f"study: failed runs: {', '.join(failed)} (their logs are above; rerun to retry)", file=sys.stderr)
        return 1
    return 0


def _check_data(cfg: Config) -> None:
    from vimoe_dist.data import check_data

    try:
        check_data(cfg)
    except UserError as e:
        raise UserError(f"{e} (the study's default task: vimoe data families --out data/families)") from None


def _run_bounded(cmd: list[str], timeout_s: float) -> int | None:
    """Runs one training run in its own process group; on timeout the whole group is ended (TERM, then KILL)."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise


def _report(report) -> int:
    for line in report.lines:
        print(line)
    print(f"wrote {report.table}, {report.plot} and {report.json}", flush=True)
    return 0


def _submit(args: argparse.Namespace, runs: list[Run], commands: list[list[str]], out: Path) -> int:
    """One Slurm job array, one task per run, submitted as `vimoe study layers` submits its array."""
    from vimoe_dist.analysis.study import submit_array

    code, job_id = submit_array(args, runs, commands, out, "vimoe-study-routers")
    if job_id is None:
        return code
    print(f"submitted array job {job_id}: {len(runs)} runs, logs in {out / 'slurm'}")
    if args.wait:
        from vimoe_dist.analysis.router_report import write_report

        return _report(write_report(out))
    print(f"when it has finished: vimoe study routers --out {out} --report-only")
    return 0
