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
import threading
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
    ro.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="local runs at once (default 1); with more, each run's output goes to OUT/ROUTER/seedS.log - on a "
        "machine of C cores, N runs of OMP_NUM_THREADS=C/N each",
    )  # fmt: skip
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
            why = f"capacity_factor 1: C = {k} x {units} / {E} = {_count(slots, 'slot')} per expert, at most "
            why += (
                f"{k * units} rows per group (dropped choices are not computed); {noise}; {kept or 'no auxiliary loss'}"
            )
        elif r.startswith("ec-"):
            ov = (*base, "model.moe.capacity_factor=1.0", "model.moe.eval_capacity_factor=1.0", *off)
            why = (
                f"capacity_factor 1: C = {_count(slots, 'slot')} per expert, always full: {k * units} rows per group; "
            )
            why += f"{noise}; no balancing loss (as its authors train it)"
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


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
    if args.jobs < 1:
        raise UserError(f"--jobs: must be >= 1, got {args.jobs}")
    cfg = load_config(config, list(args.overrides))  # a typo fails here, not in the first run
    tokens = tokens_per_image(cfg)
    matchings = match_compute(cfg, routers, tokens)
    moe = cfg.model.moe
    print(f"study: matched compute: {moe.num_experts} experts, top_k {moe.top_k}, {tokens} tokens per image, "
          f"{moe.routing} routing in groups of {_count(moe.group_size, 'image')}: {moe.top_k * tokens} expert rows per "
          "image for every router", flush=True)  # fmt: skip
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
    failed = _run_here(runs, commands, out, args)
    if args.dry_run:
        return 0
    _report(write_report(out))
    if failed:
        logs = "above" if args.jobs == 1 else f"in {out}/ROUTER/seedS.log"
        print(f"study: failed runs: {', '.join(failed)} (their logs are {logs}; rerun to retry)", file=sys.stderr)
        return 1
    return 0


def _check_data(cfg: Config) -> None:
    from vimoe_dist.data import check_data

    try:
        check_data(cfg)
    except UserError as e:
        raise UserError(f"{e} (the study's default task: vimoe data families --out data/families)") from None


def _run_here(runs: list[Run], commands: list[list[str]], out: Path, args: argparse.Namespace) -> list[str]:
    """Runs the study's runs on this machine, `--jobs` at a time, each bounded by `--timeout-s`; returns the names of
    those that failed. A run whose eval.json exists is skipped; --dry-run only prints the commands."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from vimoe_dist.metrics.progress import track

    todo = []
    for run, cmd in zip(runs, commands):
        if (out / run.name / "eval.json").is_file():
            print(f"study: {run.name} done already", flush=True)
        elif args.dry_run:
            print(f"study: {run.name}: {shlex.join(cmd)}", flush=True)
        else:
            todo.append((run, cmd))
    if not todo:
        return []
    env = None
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # N runs of all the cores each would oversubscribe
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // args.jobs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        print(f"study: {args.jobs} runs at once, OMP_NUM_THREADS={threads} each (set it to choose)", flush=True)
    runner = _Runner(args.timeout_s, env)

    def one(run: Run, cmd: list[str]) -> int | None:
        log = None if args.jobs == 1 else out / f"{run.name}.log"
        line = f"study: {run.name}: {shlex.join(cmd)}" + (f" > {log}" if log else "")
        print(line + "\n", end="", flush=True)  # one write: lines of runs started at once do not interleave
        return runner.run(cmd, log)

    failed = []
    # plain lines even on a terminal (the runs draw their own progress there): `study: i/N run`, elapsed and ETA
    progress = {"total": len(todo), "unit": "run", "bar": False, "every_s": 0}
    with ThreadPoolExecutor(args.jobs) as pool:
        try:
            futures = {pool.submit(one, run, cmd): run for run, cmd in todo}
            for future in track(as_completed(futures), "study", **progress):
                run, code = futures[future], future.result()
                if code != 0:
                    failed.append(run.name)
                    why = f"timed out after {args.timeout_s:g} s" if code is None else f"exited with {code}"
                    print(f"study: {run.name} {why}; going on with the others", file=sys.stderr, flush=True)
        except BaseException:
            runner.cancel()
            raise
    return sorted(failed)


class _Runner:
    """Runs training runs, each in its own process group, ended (TERM, then KILL) when it outlives `timeout_s`;
    `cancel` ends every run still going and starts no other (an interrupted study leaves no orphan behind)."""

    def __init__(self, timeout_s: float, env: dict[str, str] | None = None) -> None:
        self.timeout_s, self.env, self.cancelled = timeout_s, env, False
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def run(self, cmd: list[str], log: Path | None = None) -> int | None:
        """The run's exit code, or None when it timed out (or the study was cancelled)."""
        with self.lock:
            if self.cancelled:
                return None
            out = None
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
                out = open(log, "ab")  # noqa: SIM115 - closed below, after the run
            try:
                proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=out, env=self.env)
            except BaseException:
                if out is not None:
                    out.close()
                raise
            self.live.add(proc)
        try:
            return proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return None
        except BaseException:
            _end_group(proc, grace=())
            raise
        finally:
            with self.lock:
                self.live.discard(proc)
            if out is not None:
                out.close()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            live = list(self.live)
        for proc in live:
            _end_group(proc, grace=())


def _end_group(proc: subprocess.Popen, grace: tuple = ((signal.SIGTERM, 30),)) -> None:
    """Ends a run's process group: each (signal, seconds) of `grace` in turn, then KILL."""
    for sig, wait_s in (*grace, (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


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
