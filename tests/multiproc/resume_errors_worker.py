"""Resumes one checkpoint under several configs that do not fit it, through the trainer's own `checkpoint.resume`
after the trainer's build (model, parallelize, engine), and records each one's error (started by torchrun from
test_resume_errors.py; one engine per case in one process, instead of one `vimoe train` each).

Usage: torchrun --nproc-per-node 1 tests/multiproc/resume_errors_worker.py SPEC.json
SPEC: {"out": FILE, "tag": TAG, "base": [overrides], "cases": {name: {"overrides": [...], "checkpoint": DIR}}}
"""

import json
import sys
from pathlib import Path

from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError
from vimoe_dist.model import build_model
from vimoe_dist.parallel.env import resolve_env
from vimoe_dist.parallel.init import init_distributed
from vimoe_dist.parallel.parallelize import parallelize
from vimoe_dist.train import checkpoint
from vimoe_dist.train.setup import build_engine, seed_everything


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    env = resolve_env()
    errors = {}
    for name, case in spec["cases"].items():
        cfg = load_config("configs/digits.yaml", [*spec["base"], *case["overrides"]])
        init_distributed(cfg, env)
        seed_everything(cfg.run.seed)
        engine, _, _ = build_engine(parallelize(build_model(cfg.model), cfg.parallel.ep_size), cfg, env.world_size)
        try:
            checkpoint.resume(engine, cfg, (Path(case["checkpoint"]), spec["tag"]), env)
            errors[name] = None
        except UserError as e:
            errors[name] = str(e)
    Path(spec["out"]).write_text(json.dumps(errors))


if __name__ == "__main__":
    main()
