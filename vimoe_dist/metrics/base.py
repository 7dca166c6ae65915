"""The sink protocol and `Metrics`, the one object the trainer talks to; it hands every call to its sinks.

Tracking never stops training: a sink whose call raises (a full disk under TensorBoard's event file, W&B's service
gone) logs one warning, is closed and is dropped; the others go on. `metrics.jsonl` handles a full disk itself
(`jsonl.py`) and stays open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are built, not by `vimoe --help`
    from vimoe_dist.metrics.prometheus import PrometheusSink

log = logging.getLogger(__name__)

STATE_VERSION = 1


class MetricsSink(Protocol):
    """Something that receives the trainer's numbers (JSONL file, console, Prometheus, TensorBoard, W&B)."""

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None: ...

    def on_log(self, record: Mapping[str, Any]) -> None: ...

    def on_eval(self, record: Mapping[str, Any]) -> None: ...

    def on_checkpoint(self, step: int, seconds: float) -> None: ...

    def on_event(self, name: str, **fields: Any) -> None: ...

    def on_image(self, tag: str, image: Any, step: int) -> None:
        """`image`: an RGB uint8 array [H, W, 3] (`Metrics.on_image` converts figures and files)."""
        ...

    def close(self) -> None: ...


class Metrics:
    """Fans the trainer's calls out to the sinks of this rank (see the package docstring for the contract).

    Args:
        sinks: the file and console sinks (rank 0) and the Prometheus sink (every rank), in call order.
        prometheus: the Prometheus sink among `sinks`, which holds the counter totals saved in checkpoints.
        rank: global rank, to pick this rank's entry from an all-gathered list of states.
        run_dir: the run directory, where `publish_targets` writes the Prometheus targets file.
    """

    def __init__(
        self, sinks: Sequence[MetricsSink], prometheus: PrometheusSink, rank: int, run_dir: str | Path | None = None
    ) -> None:
        self.sinks = list(sinks)
        self._on_step = tuple(self.sinks)  # iterated every step; rebuilt when a sink is dropped
        self.prometheus = prometheus
        self.rank = rank
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.targets_file: Path | None = None  # written by publish_targets on rank 0, emptied at close
        self._closed = False

    @property
    def port(self) -> int | None:
        """The port this rank serves /metrics on, or None when `metrics.port` is 0."""
        return self.prometheus.port

    @property
    def accepts_images(self) -> bool:
        """Whether `on_image` goes anywhere (TensorBoard or W&B on this rank): skip drawing figures when not."""
        return any(getattr(sink, "accepts_images", False) for sink in self.sinks)

    def on_step(
        self,
        step: int,
        images: int,
        step_seconds: float,
        data_wait_seconds: float = 0.0,
        alltoall_seconds: float = 0.0,
    ) -> None:
        """Every step: counters and the step-time histogram only (no I/O, no lock, no collective)."""
        for sink in self._on_step:
            try:
                sink.on_step(step, images, step_seconds, data_wait_seconds, alltoall_seconds)
            except Exception as e:
                self._drop(sink, e)

    def on_log(self, record: Mapping[str, Any]) -> None:
        """Every `train.log_every` steps, with the record described in the package docstring."""
        self._call("on_log", record)

    def on_eval(self, record: Mapping[str, Any]) -> None:
        self._call("on_eval", record)

    def on_checkpoint(self, step: int, seconds: float) -> None:
        self._call("on_checkpoint", step, seconds)

    def on_event(self, name: str, **fields: Any) -> None:
        """A warning worth a line in the file and a tick of `vimoe_events_total{event=name}`."""
        self._call("on_event", name, **fields)

    def on_image(self, tag: str, image: Any, step: int) -> None:
        """An image for the experiment trackers, e.g. a routing heatmap at an evaluation.

        Args:
            tag: its name in TensorBoard / W&B, e.g. `routing/block_10`.
            image: a matplotlib `Figure`, a path to an image file (PNG, JPEG), or an array [H, W], [H, W, 3] or
                [H, W, 4] (uint8, or floats in [0, 1]).
            step: the training step it belongs to.
        """
        if not self.accepts_images:
            return
        from vimoe_dist.metrics.images import to_rgb

        try:
            rgb = to_rgb(image)
        except (OSError, ValueError, TypeError) as e:
            log.warning("metrics: image %r of step %d cannot be read (%s); skipped", tag, step, e)
            return
        self._call("on_image", tag, rgb, step)

    def publish_targets(self) -> Path | None:
        """Collective: every rank's actual `host:port` into `RUN_DIR/prometheus_targets.json`, written by rank 0.

        Every rank calls it once, after `build_metrics` and once the process group exists (a single process
        needs none). Does nothing (and no collective) when `metrics.port` is 0. Returns the file on rank 0.
        """
        from vimoe_dist.metrics.targets import publish_targets

        path = publish_targets(self.prometheus.endpoint(), self.rank, self.run_dir)
        if path is not None:
            self.targets_file = path
        return path

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args, **kwargs)
            except Exception as e:
                self._drop(sink, e)

    def _drop(self, sink: MetricsSink, error: Exception) -> None:
        """One warning, then the sink is closed and left out: tracking never stops training."""
        name = getattr(sink, "name", type(sink).__name__)
        log.warning("metrics: %s failed (%s); it is closed and training goes on", name, one_line(error))
        if sink in self.sinks:
            self.sinks.remove(sink)
            self._on_step = tuple(self.sinks)
        with contextlib.suppress(Exception):
            sink.close()

    def state_dict(self) -> dict:
        """Counter totals of this rank, to be saved with the checkpoint."""
        return {"version": STATE_VERSION, "rank": self.rank, "exporter": self.prometheus.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Restores counter totals so that no counter decreases across a resume.

        Args:
            state: this rank's `state_dict()`, or the list of every rank's (as `all_gather_object` returns it;
                the entry whose `rank` is this rank's is used). Call once, before the first step.
        """
        if isinstance(state, Sequence):
            mine = [s for s in state if isinstance(s, Mapping) and s.get("rank") == self.rank]
            if not mine:
                log.warning("metrics: no saved counter state for rank %d; counters start from zero", self.rank)
                return
            state = mine[0]
        if state.get("rank") != self.rank:
            log.warning("metrics: loading rank %s's counter state on rank %d", state.get("rank"), self.rank)
        if state.get("version") != STATE_VERSION:
            log.warning("metrics: counter state version %r is not %d; ignored", state.get("version"), STATE_VERSION)
            return
        self.prometheus.load_state_dict(state.get("exporter", {}))

    def close(self) -> None:
        """Pushes to the Pushgateway (if configured), stops the endpoint, closes the files, the trackers and the
        bar, and empties the targets file (so Prometheus forgets the job's endpoints)."""
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # one sink failing to close must not keep the others open
                log.warning("metrics: closing %s failed (%s)", getattr(sink, "name", type(sink).__name__), one_line(e))
        if self.targets_file is not None:
            from vimoe_dist.metrics.targets import clear_targets

            clear_targets(self.targets_file)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, for a warning that stays one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
