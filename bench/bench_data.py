"""Data pipeline benchmark: WebDataset stream vs torchvision ImageFolder on the same JPEGs, and the data-wait
fraction of a training step at the demo and ViT-S settings (see vimoe_dist/data/bench.py).

    .venv/bin/python bench/bench_data.py [--quick] [--out bench/results/data.json]

`vimoe bench data [--quick] [--out FILE]` runs the same.
"""

from __future__ import annotations

import sys

from vimoe_dist.data.bench import main

if __name__ == "__main__":
    sys.exit(main())
