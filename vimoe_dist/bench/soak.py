"""`vimoe bench soak`: a long training run whose resident memory must stay flat after warm-up.

A multi-day job dies of a slow leak long before it dies of anything else. This starts the digits config on 2 CPU
ranks under torchrun (the real trainer, nothing mocked) with everything that could accumulate switched on:
routing statistics logged every `--log-every` steps, the Prometheus endpoint scraped every few seconds (label sets
must not grow), the streaming data pipeline with its DataLoader worker looping over the shards epoch after epoch,
and periodic checkpoints. Once a second it reads from /proc the resident memory (`VmRSS`, and `RssAnon`, the
anonymous part where a leak shows) of every rank and of every rank's DataLoader workers, with the step each rank has
reached. After warm-up (`--warmup` of the steps) it fits a line to memory against step; the growth over the
post-warm-up span, extrapolated to 1,000 steps, is the figure of merit (the final evaluation and save after the last
step are drawn but left out of the fit).

    vimoe bench soak                                 # 2,000 steps, bench/results/soak.{json,png}
    vimoe bench soak --steps 300 --out /tmp/soak.json  # a short check

The JSON holds every sample, the fitted slopes per process and the Prometheus series counts over time; the PNG plots
memory against step per process with the warm-up boundary marked.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vimoe_dist.net import free_port_block

MIB = 1024 * 1024
MIN_SAMPLES = 10  # samples after warm-up for a process to count as long-lived


def register_soak(bsub: argparse._SubParsersAction) -> None:
    """Adds `vimoe bench soak` (called from bench/cli.py; this module imports nothing heavy at load)."""
    p = bsub.add_parser("soak", help="2,000 steps on 2 ranks: resident memory per rank must stay flat after warm-up")
    soak_arguments(p)
    p.set_defaults(func=lambda args: 0 if run(args)["flat"] else 1)


def soak_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10, help="routing statistics and metrics.jsonl interval")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--warmup", type=float, default=0.25, help="fraction of the steps left out of the fit")
    p.add_argument("--limit-mib-per-1k", type=float, default=8.0, help="growth per 1,000 steps counted as a leak")
    p.add_argument("--data", default="data/digits", help="digits shards (written there first when missing)")
    p.add_argument("--out", default="bench/results/soak.json")
    p.add_argument("--plot", default=None, help="PNG (default: the --out path with .png)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")


def run(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    if not (data / "train.json").is_file():
        from vimoe_dist.data import write_digits

        write_digits(data)
    with tempfile.TemporaryDirectory(prefix="vimoe-soak-") as tmp:
        result = soak(args, data, Path(tmp) / "run")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    draw(result, plot)
    _print_summary(result, out, plot)
    return result


def soak(args: argparse.Namespace, data: Path, run_dir: Path) -> dict:
    """Runs the job, samples memory once a second, and returns samples, fits and verdict."""
    port = free_port_block(args.nproc)
    num_train = len(list(data.glob("train-*.tar")))
    overrides = [
        f"run.out_dir={run_dir}",
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.checkpoint_every={args.checkpoint_every}",
        "train.eval_every=0",
        "train.progress=false",
        f"data.train={data}/train-{{000000..{num_train - 1:06d}}}.tar",
        f"data.val={data}/val-000000.tar",
        f"metrics.port={port}",
        *args.overrides,
    ]
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        "-m", "vimoe_dist", "train", "--config", args.config, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # DeepSpeed JIT-builds its CPU communication op into torch's extension cache; a cache shared with another
    # checkout's interpreter is rebuilt back and forth (and a build one of them interrupts fails the other): one per
    # interpreter
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    log_path = run_dir.parent / "soak.log"
    samples: list[dict] = []
    series: list[dict] = []
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            next_scrape = 0.0
            while agent.poll() is None:
                now = time.monotonic() - t0
                samples.extend(_sample(agent.pid, now, time.time()))
                if now >= next_scrape:
                    series.extend(_scrape(port, args.nproc, now, time.time()))
                    next_scrape = now + 5.0
                time.sleep(1.0)
        finally:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
    code = agent.returncode
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the soak run exited {code}:\n{tail}")
    _attach_steps(samples + series, run_dir / "metrics.jsonl")
    return summarize(samples, series, args)


# ---------------------------------------------------------------------------------------------- sampling


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return fields


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _sample(agent: int, seconds: float, wall: float) -> list[dict]:
    """One sample per rank and per DataLoader worker of each rank."""
    rows = []
    for pid in _children(agent):
        rank = _rank_of(pid)
        if rank is None:
            continue
        for proc, role in [(pid, "rank"), *((w, "worker") for w in _children(pid))]:
            status = _status(proc)
            if status:
                rows.append({"t": round(seconds, 2), "wall": round(wall, 3), "rank": rank, "role": role, "pid": proc,
                             "rss": status.get("VmRSS", 0), "anon": status.get("RssAnon", 0),
                             "file": status.get("RssFile", 0), "shmem": status.get("RssShmem", 0)})  # fmt: skip
    return rows


def _scrape(port: int, nproc: int, seconds: float, wall: float) -> list[dict]:
    """Series count of each rank's /metrics (a label set that grows shows here first)."""
    rows = []
    for local_rank in range(nproc):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port + local_rank}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            continue
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        rows.append({"t": round(seconds, 2), "wall": round(wall, 3), "rank": local_rank, "series": len(lines)})
    return rows


def _attach_steps(samples: list[dict], metrics_path: Path) -> None:
    """Gives each sample the last step rank 0 had logged by then (metrics.jsonl records carry epoch seconds)."""
    import bisect

    points = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec and "event" not in rec and "time" in rec:
                points.append((rec["time"], rec["step"]))
    points.sort()
    times = [t for t, _ in points]
    for s in samples:
        i = bisect.bisect_right(times, s["wall"])
        if i:
            s["step"] = points[i - 1][1]
        # after the last logged step the job evaluates, saves and exits: not part of the steady state
        s["training"] = bool(times) and s["wall"] <= times[-1]


# ----------------------------------------------------------------------------------------------- analysis


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def summarize(samples: list[dict], series: list[dict], args: argparse.Namespace) -> dict:
    """Per long-lived process (each rank, each rank's DataLoader worker): memory after warm-up and its fitted growth,
    plus the memory timeline for the figure. Short-lived children (a compiler run while DeepSpeed builds its CPU op,
    the final evaluation's worker) are only counted."""
    warm = int(args.steps * args.warmup)
    processes, timeline, short_lived, workers_of = {}, {}, 0, collections.Counter()
    keys = sorted({(s["rank"], s["role"], s["pid"]) for s in samples})
    for rank, role, pid in keys:
        rows = [s for s in samples if (s["rank"], s["role"], s["pid"]) == (rank, role, pid) and "step" in s]
        after = [s for s in rows if s["step"] >= warm and s["training"]]
        if len(after) < MIN_SAMPLES:
            short_lived += 1
            continue
        workers_of[rank] += role == "worker"
        name = f"rank {rank}" if role == "rank" else f"rank {rank} data worker"
        name += f" {workers_of[rank]}" if role == "worker" and workers_of[rank] > 1 else ""
        rss_slope = fit_slope([(s["step"], s["rss"]) for s in after])
        anon_slope = fit_slope([(s["step"], s["anon"]) for s in after])
        processes[name] = {
            "rank": rank,
            "role": role,
            "samples": len(rows),
            "rss_mib_after_warmup_first": after[0]["rss"] / MIB,
            "rss_mib_last": after[-1]["rss"] / MIB,
            "rss_mib_max": max(s["rss"] for s in rows) / MIB,
            "rss_mib_per_1k_steps": rss_slope * 1000 / MIB,
            "anon_mib_per_1k_steps": anon_slope * 1000 / MIB,
        }
        timeline[name] = {
            "step": [s["step"] for s in rows],
            "rss_mib": [round(s["rss"] / MIB, 2) for s in rows],
            "anon_mib": [round(s["anon"] / MIB, 2) for s in rows],
            "training": [int(s["training"]) for s in rows],
        }
    growth = [p["rss_mib_per_1k_steps"] for p in processes.values()]
    counts = {}
    for r in sorted({s["rank"] for s in series}):
        values = [s["series"] for s in series if s["rank"] == r]
        after = [s["series"] for s in series if s["rank"] == r and s.get("step", -1) >= warm and s["training"]]
        counts[str(r)] = {"first": values[0], "last": values[-1], "min_after_warmup": min(after, default=None),
                          "max_after_warmup": max(after, default=None)}  # fmt: skip
    return {
        "config": args.config,
        "steps": args.steps,
        "ranks": args.nproc,
        "warmup_steps": warm,
        "limit_mib_per_1k_steps": args.limit_mib_per_1k,
        "flat": bool(processes) and all(g < args.limit_mib_per_1k for g in growth),
        "worst_mib_per_1k_steps": max(growth) if growth else None,
        "processes": processes,
        "short_lived_children": short_lived,
        "prometheus_series": counts,
        "timeline": timeline,
    }


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, line in result["timeline"].items():
        steps = [s for s, t in zip(line["step"], line["training"]) if t]
        rss = [m for m, t in zip(line["rss_mib"], line["training"]) if t]
        ax.plot(steps, rss, label=name, linestyle="-" if result["processes"][name]["role"] == "rank" else "--")
    ax.axvspan(0, result["warmup_steps"], color="grey", alpha=0.12, linewidth=0, label="warm-up (not fitted)")
    worst = result["worst_mib_per_1k_steps"]
    ax.set_title(f"{result['config']}: {result['steps']} steps on {result['ranks']} CPU ranks\n"
                 f"largest growth after warm-up: {worst:+.2f} MiB per 1,000 steps", fontsize=10)  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory, VmRSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, result["steps"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(result: dict, out: Path, plot: Path) -> None:
    print(f"soak: {result['steps']} steps on {result['ranks']} ranks; growth after step {result['warmup_steps']}:")
    for name, p in result["processes"].items():
        first, last = p["rss_mib_after_warmup_first"], p["rss_mib_last"]
        print(f"  {name:<24} RSS {first:7.1f} -> {last:7.1f} MiB  {p['rss_mib_per_1k_steps']:+6.2f} MiB/1k steps "
              f"(anonymous {p['anon_mib_per_1k_steps']:+6.2f})")  # fmt: skip
    for rank, c in result["prometheus_series"].items():
        print(f"  rank {rank} /metrics series: {c['first']} at the first scrape, {c['min_after_warmup']}-"
              f"{c['max_after_warmup']} after warm-up, {c['last']} at the last")  # fmt: skip
    print(f"  {'flat' if result['flat'] else 'GROWING'} (limit {result['limit_mib_per_1k_steps']} MiB/1k steps); "
          f"wrote {out} and {plot}")  # fmt: skip
