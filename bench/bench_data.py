"""Data pipeline benchmark: WebDataset stream vs torchvision ImageFolder on the same JPEGs, and the data-wait
fraction of a training step at the demo and ViT-S settings (see vimoe_dist/data/bench.py).

    .venv/bin/python bench/bench_data.py [--quick] [--out runs/bench/data.json]

`vimoe bench data` runs the same function.
"""

from __future__ import annotations

import argparse

from vimoe_dist.data.bench import run_data_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/data.json", help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke run)")
    args = parser.parse_args()
    run_data_bench(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
