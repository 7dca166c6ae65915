"""`metrics.wandb: {project: ..., mode: offline | online | disabled}`: rank 0 logs the run to Weights & Biases.

- W&B's files go to `RUN/wandb/` (an offline run is uploaded later with `wandb sync RUN/wandb/offline-run-*`).
- The W&B run id is kept in `RUN/wandb_run_id`: rerunning the command on the run directory (a resume, a requeued
  Slurm job) continues the same W&B run (`resume="allow"`) instead of starting a new one.
- Every value is logged with the trainer's step as its x axis (`define_metric(..., step_metric="step")`), not as
  W&B's own `_step`: after a resume the redone steps come again, and W&B drops values whose `_step` goes back.
- The resolved config is the run's config, so runs can be compared and filtered by any key.
- The console is not captured (the job's log keeps it), and `wandb.init` / `run.finish` wait at most
  `INIT_TIMEOUT_S` / `FINISH_TIMEOUT_S` (W&B's own settings): an unreachable server delays neither the start nor the
  end of a job for long, and what was not uploaded stays in `RUN/wandb/` for `wandb sync`.

What is logged, and under which names, is `tracking.py`'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vimoe_dist.atomic import write_atomic
from vimoe_dist.errors import UserError
from vimoe_dist.metrics.tracking import TrackerSink

if TYPE_CHECKING:
    from vimoe_dist.config import WandbConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "vimoe"
INIT_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 60.0
STEP_KEY = "step"
INSTALL_HINT = "pip install 'vimoe-dist[wandb]' (or pip install wandb)"
_RUN_ID = re.compile(r"[a-z0-9]{1,64}")


def require_package() -> None:
    """The one-line error for `metrics.wandb` without its package (imports nothing: a cheap pre-launch check)."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"metrics.wandb: needs the wandb package: {INSTALL_HINT}")


def wandb_enabled(w: WandbConfig) -> bool:
    """W&B is on when a project or a mode other than `disabled` is set."""
    return w.mode != "disabled" and (w.project is not None or w.mode is not None)


class WandbSink(TrackerSink):
    """A W&B run of rank 0.

    Args:
        w: `metrics.wandb`.
        run_dir: the run directory.
        start_step: the step a resumed run starts from (0 for a new run).
        config: the resolved config (the W&B run's config).

    Raises:
        UserError: the `wandb` package is missing.
        Exception: whatever `wandb.init` raises (no network in online mode, no API key): `build_metrics` turns it
            into one warning and the run goes on without W&B.
    """

    name = "W&B (metrics.wandb)"

    def __init__(
        self, w: WandbConfig, run_dir: str | Path, start_step: int = 0, config: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(start_step)
        require_package()
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        run_id = keep_run_id(run_dir)
        wanted = {"console": "off", "init_timeout": INIT_TIMEOUT_S, "finish_timeout": FINISH_TIMEOUT_S}
        known = getattr(wandb.Settings, "model_fields", wanted)  # older releases lack some of these settings
        self.run = wandb.init(
            project=w.project or DEFAULT_PROJECT, entity=w.entity, name=w.name or run_dir.resolve().name,
            group=w.group, tags=list(w.tags) or None, mode=w.mode, dir=str(run_dir), id=run_id, resume="allow",
            config=dict(config) if config is not None else None, job_type="train", reinit="create_new",
            settings=wandb.Settings(**{k: v for k, v in wanted.items() if k in known}),
        )  # fmt: skip
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        data: dict[str, Any] = {STEP_KEY: step, **scalars}
        for tag, counts in histograms.items():
            edges = np.arange(len(counts) + 1, dtype=np.float64) - 0.5  # bucket e is expert e
            data[tag] = self._wandb.Histogram(np_histogram=(np.asarray(counts).tolist(), edges.tolist()))
        self.run.log(data)

    def write_text(self, step: int, tag: str, text: str) -> None:
        pass  # events are counted under events/<name> (write); W&B has no per-step text series

    def write_image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        self.run.log({STEP_KEY: step, tag: self._wandb.Image(rgb)})

    def close(self) -> None:
        self.run.finish()


def keep_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: read from `RUN/wandb_run_id`, or made and stored there first."""
    path = run_dir / RUN_ID_FILE
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = path.read_text().strip()
        if _RUN_ID.fullmatch(text):
            return text
        log.warning("metrics.wandb: %s does not hold a W&B run id (%r); starting a new W&B run", path, text[:40])
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own form
    write_atomic(path, run_id + "\n")
    return run_id
