"""The Prometheus sink of one rank: its series (`exporter.TrainingCollector`), the `/metrics` endpoint on
`metrics.addr:metrics.port + LOCAL_RANK`, and an optional push of the final values to a Pushgateway.

A Pushgateway (https://github.com/prometheus/pushgateway) exists for batch jobs that may end between two scrapes;
each rank pushes once, at `close()`, grouped by `job` and `rank`, so the last values of a short job survive it.
Scrape the gateway with `honor_labels: true` so the pushed `job`/`rank` labels are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway

from vimoe_dist.metrics.exporter import TrainingCollector
from vimoe_dist.metrics.server import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)


class PrometheusSink:
    """Series of one rank, served over HTTP when `port` is non-zero and pushed at close when `pushgateway` is set.

    Args:
        collector: the rank's series.
        addr: interface to bind (`metrics.addr`).
        port: `metrics.port`; 0 opens no port.
        local_rank: added to `port`, so the ranks of one node do not collide.
        port_search: take the next free port when the wanted one is in use (logged).
        pushgateway: URL (or host:port) of a Pushgateway, or None.
        push_timeout_s: how long the final push may take before it is given up (with a warning).
    """

    def __init__(
        self,
        collector: TrainingCollector,
        addr: str = "127.0.0.1",
        port: int = 0,
        local_rank: int = 0,
        port_search: bool = False,
        pushgateway: str | None = None,
        push_timeout_s: float = 10.0,
    ) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.pushgateway, self.push_timeout_s = pushgateway, push_timeout_s
        self.server: MetricsServer | None = None
        if port:
            what = f"metrics.port {port} + local rank {local_rank}" if local_rank else f"metrics.port {port}"
            self.server = start_metrics_server(self.render, addr, port + local_rank, port_search, what)

    @property
    def port(self) -> int | None:
        """The bound port, or None when no endpoint is open."""
        return self.server.port if self.server else None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_step(
        self, step: int, images: int, step_seconds: float, data_wait_seconds: float, alltoall_seconds: float
    ) -> None:
        self.collector.on_step(step, images, step_seconds, data_wait_seconds, alltoall_seconds)

    def on_log(self, record: Mapping[str, Any]) -> None:
        self.collector.on_log(record)

    def on_eval(self, record: Mapping[str, Any]) -> None:
        self.collector.on_eval(record)

    def on_checkpoint(self, step: int, seconds: float) -> None:
        self.collector.on_checkpoint(step, seconds)

    def on_event(self, name: str, **fields: Any) -> None:
        self.collector.on_event(name)

    def on_image(self, tag: str, image: Any, step: int) -> None:
        pass

    def endpoint(self) -> tuple[str, int] | None:
        """(address bound, port bound) of the endpoint, or None when none is open."""
        return (self.server.addr, self.server.port) if self.server else None

    def state_dict(self) -> dict:
        return self.collector.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.collector.load_state_dict(state)

    def close(self) -> None:
        if self.pushgateway:
            job, rank = self.collector.labels
            try:
                push_to_gateway(
                    self.pushgateway, job=job, registry=self.registry, grouping_key={"rank": rank},
                    timeout=self.push_timeout_s,
                )  # fmt: skip
            except Exception as e:  # the run itself succeeded; a gateway outage must not turn it into a failure
                log.warning("metrics.pushgateway: pushing to %s failed: %s", self.pushgateway, e)
        if self.server:
            self.server.close()
            self.server = None
