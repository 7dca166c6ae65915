"""`metrics.tensorboard: true`: rank 0 writes TensorBoard event files to `RUN/tb/` (`tensorboard --logdir RUN/tb`,
or the parent of several run directories to compare runs).

Written with PyTorch's `torch.utils.tensorboard.SummaryWriter` (its event files are TensorBoard's own format; the
`tensorboard` package must be installed). What is shown, and under which names, is `tracking.py`'s. The resolved
config is stored once per start as text (`config`), so a run's settings sit next to its curves.

A resumed run passes `purge_step`: TensorBoard then hides the events of the previous attempt beyond the checkpoint
(the stretch of training being redone), as `metrics.jsonl` drops its lines.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vimoe_dist.errors import UserError
from vimoe_dist.metrics.tracking import TrackerSink

DIRNAME = "tb"
FLUSH_SECONDS = 30  # how stale a live TensorBoard may be (the writer flushes in its own thread)
INSTALL_HINT = "pip install 'vimoe-dist[tensorboard]' (or pip install tensorboard)"


def require_package() -> None:
    """The one-line error for `metrics.tensorboard` without its package (imports nothing: a cheap pre-launch check)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"metrics.tensorboard: needs the tensorboard package: {INSTALL_HINT}")


class TensorBoardSink(TrackerSink):
    """TensorBoard event files of rank 0 in `run_dir/tb`.

    Args:
        run_dir: the run directory.
        start_step: the step a resumed run starts from (0 for a new run).
        config: the resolved config, stored as text.

    Raises:
        UserError: the `tensorboard` package is missing, or `run_dir/tb` cannot be written.
    """

    name = "TensorBoard (metrics.tensorboard)"

    def __init__(self, run_dir: str | Path, start_step: int = 0, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(start_step)
        require_package()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / DIRNAME
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(
                str(self.log_dir), purge_step=start_step + 1 if start_step > 0 else None, flush_secs=FLUSH_SECONDS
            )
        except OSError as e:
            raise UserError(f"metrics.tensorboard: cannot write {self.log_dir} ({e.strerror or e})") from None
        if config is not None:
            text = yaml.safe_dump(dict(config), sort_keys=False)
            self._writer.add_text("config", "```\n" + text + "```", start_step)  # markdown: keep the YAML as is

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        for tag, counts in histograms.items():
            self._writer.add_histogram_raw(tag, **expert_histogram(counts), global_step=step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def write_image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        self._writer.add_image(tag, rgb, step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


def expert_histogram(counts: np.ndarray) -> dict[str, Any]:
    """TensorBoard's raw histogram fields for per-expert counts: bucket e spans [e - 1/2, e + 1/2], so expert e sits
    at x = e. TensorBoard draws a bucket from the previous limit (or `min`) to its limit (the last one to `max`), so
    `min` and `max` are the outer edges; `sum` and `sum_squares` are the moments of the expert ids weighted by the
    counts."""
    counts = np.asarray(counts, dtype=np.float64)
    experts = np.arange(len(counts), dtype=np.float64)
    return {
        "min": -0.5,
        "max": len(counts) - 0.5,
        "num": float(counts.sum()),
        "sum": float((experts * counts).sum()),
        "sum_squares": float((experts**2 * counts).sum()),
        "bucket_limits": (experts + 0.5).tolist(),
        "bucket_counts": counts.tolist(),
    }
