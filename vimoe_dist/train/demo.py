"""`make demo`: the digits shards, then the demo config trained expert-parallel on 2 CPU ranks through the deepspeed
launcher, then the final top-1 and where the run directory is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/digits.yaml"
DATA = Path("data/digits")


def run_demo(out_dir: str, nproc: int = 2) -> int:
    from vimoe_dist.launch.cmdline import build_deepspeed_local

    if not (DATA / "train.json").is_file():
        from vimoe_dist.data import write_digits

        print(f"writing scikit-learn's digits as WebDataset shards to {DATA}/", flush=True)
        write_digits(DATA)
    out = Path(out_dir)
    if out.exists():
        print(f"removing the previous demo run {out}/ (a rerun of `vimoe train` on it would resume instead)")
        shutil.rmtree(out)
    cmd = build_deepspeed_local(sys.executable, nproc, CONFIG, [f"run.out_dir={out}"])
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        print(f"demo: training failed with exit code {code}", file=sys.stderr)
        return code
    result = json.loads((out / "eval.json").read_text())
    print(
        f"\ndemo: top-1 {result['top1']:.4f} (top-5 {result['top5']:.4f}) on {result['images']} held-out digits, "
        f"{nproc} CPU ranks, expert-parallel, in {time.perf_counter() - t0:.0f} s\n"
        f"run directory: {out.resolve()} (config.yaml, metrics.jsonl, checkpoints/, eval.json)\n"
        f"next: vimoe plot {out}  |  vimoe eval --config {CONFIG} --checkpoint {out}"
    )
    return 0
