"""`vimoe doctor [--config FILE] [--gpu-bench] [--json FILE]`: check a node before a job (see doctor/__init__.py).

Exit status: 0 when nothing failed (warnings included), 1 when a check failed, 2 for bad input (a bad config, or
`--gpu-bench` without a GPU).
"""

from __future__ import annotations

import argparse
import socket
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this node before a job (GPUs, NCCL, DeepSpeed, /dev/shm, data, ...)")
    p.add_argument("--config", metavar="FILE", help="also check the run's inputs: shards, pretrained file, ports")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dot-list overrides of the config")
    p.add_argument(
        "--gpu-bench", action="store_true",
        help="measure the GPUs: grouped-GEMM experts, a bf16 training step (images/s, MFU), all-to-all",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-': stdout; report on stderr)")
    p.add_argument("--peak-tflops", type=float, metavar="T", help="the GPU's dense peak for MFU (unknown GPUs)")
    p.add_argument("--batch", type=int, metavar="B", help="images per training step of --gpu-bench")
    p.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    import time

    from vimoe_dist.config import ConfigError, load_config
    from vimoe_dist.doctor.run import DoctorOptions, exit_code, report, run_doctor, write_json

    if args.overrides and not args.config:
        raise ConfigError("key=value overrides need --config FILE")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops: {args.peak_tflops} is not a positive number")
    cfg = load_config(args.config, args.overrides) if args.config else None
    options = DoctorOptions(args.config, args.overrides, args.gpu_bench, args.json, args.peak_tflops, args.batch)
    stream = sys.stderr if args.json == "-" else sys.stdout

    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    t0 = time.perf_counter()
    checks, bench = run_doctor(cfg, options, write)
    seconds = time.perf_counter() - t0
    report(checks, seconds, args.config, write)
    json_path = args.json
    if json_path is None and args.gpu_bench:
        json_path = f"doctor-gpu-bench-{socket.gethostname()}.json"
    if json_path:
        write_json(json_path, checks, bench, seconds, args.config)
        if json_path != "-":
            write(f"wrote {json_path}")
    return exit_code(checks)
