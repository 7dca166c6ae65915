"""The sink protocol and `Metrics`, the one object the trainer talks to; it hands every call to its sinks."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are built, not by `vimoe --help`
    from vimoe_dist.metrics.prometheus import PrometheusSink

log = logging.getLogger(__name__)

STATE_VERSION = 1


class MetricsSink(Protocol):
    """Something that receives the trainer's numbers (JSONL file, console, Prometheus)."""

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None: ...

    def on_log(self, record: Mapping[str, Any]) -> None: ...

    def on_eval(self, record: Mapping[str, Any]) -> None: ...

    def on_checkpoint(self, step: int, seconds: float) -> None: ...

    def on_event(self, name: str, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Metrics:
    """Fans the trainer's calls out to the sinks of this rank (see the package docstring for the contract).

    Args:
        sinks: the file and console sinks (rank 0) and the Prometheus sink (every rank), in call order.
        prometheus: the Prometheus sink among `sinks`, which holds the counter totals saved in checkpoints.
        rank: global rank, to pick this rank's entry from an all-gathered list of states.
    """

    def __init__(self, sinks: Sequence[MetricsSink], prometheus: PrometheusSink, rank: int) -> None:
        self.sinks = list(sinks)
        self.prometheus = prometheus
        self.rank = rank
        self._closed = False

    @property
    def port(self) -> int | None:
        """The port this rank serves /metrics on, or None when `metrics.port` is 0."""
        return self.prometheus.port

    def on_step(
        self,
        step: int,
        images: int,
        step_seconds: float,
        data_wait_seconds: float = 0.0,
        alltoall_seconds: float = 0.0,
    ) -> None:
        """Every step: counters and the step-time histogram only (no I/O, no lock, no collective)."""
        for sink in self.sinks:
            sink.on_step(step, images, step_seconds, data_wait_seconds, alltoall_seconds)

    def on_log(self, record: Mapping[str, Any]) -> None:
        """Every `train.log_every` steps, with the record described in the package docstring."""
        for sink in self.sinks:
            sink.on_log(record)

    def on_eval(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.on_eval(record)

    def on_checkpoint(self, step: int, seconds: float) -> None:
        for sink in self.sinks:
            sink.on_checkpoint(step, seconds)

    def on_event(self, name: str, **fields: Any) -> None:
        """A warning worth a line in the file and a tick of `vimoe_events_total{event=name}`."""
        for sink in self.sinks:
            sink.on_event(name, **fields)

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
        """Pushes to the Pushgateway (if configured), stops the endpoint, closes the file and the bar."""
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # one sink failing to close must not keep the others open
                log.exception("metrics: closing %s failed", type(sink).__name__)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
