"""`build_metrics`: the one place the `metrics` config becomes sinks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vimoe_dist import __version__
from vimoe_dist.metrics.base import Metrics, MetricsSink

if TYPE_CHECKING:
    from vimoe_dist.config import Config


def build_metrics(
    cfg: Config,
    rank: int,
    local_rank: int,
    world_size: int,
    run_dir: str | Path,
    total_steps: int,
    start_step: int = 0,
    stream: TextIO | None = None,
) -> Metrics:
    """The sinks of one rank: rank 0 writes `run_dir/metrics.jsonl` and shows progress (`train.progress`); every
    rank keeps the Prometheus series and serves them on `metrics.addr:metrics.port + local_rank` (port 0: none).

    Args:
        cfg: the validated run config.
        rank, local_rank, world_size: this process's place in the job.
        run_dir: the run directory (`run.out_dir`).
        total_steps: `train.steps`, for the progress bar, the ETA and `vimoe_train_steps_target`.
        start_step: the step a resumed run starts from (0 for a new run).
        stream: where the progress goes (stderr by default).

    Raises:
        UserError: the port is taken (without `metrics.port_search`) or `metrics.addr` cannot be bound.
    """
    from vimoe_dist.metrics.exporter import TrainingCollector
    from vimoe_dist.metrics.prometheus import PrometheusSink

    m = cfg.metrics
    build_info = {
        "version": __version__,
        "config_hash": config_hash(cfg),
        "world_size": str(world_size),
        "ep_size": str(cfg.parallel.ep_size),
        "backbone": cfg.model.backbone,
        "router": cfg.model.moe.router,
    }
    collector = TrainingCollector(m.job, rank, build_info, total_steps)
    prometheus = PrometheusSink(
        collector, addr=m.addr, port=m.port, local_rank=local_rank, port_search=m.port_search,
        pushgateway=m.pushgateway, push_timeout_s=m.push_timeout_s,
    )  # fmt: skip
    sinks: list[MetricsSink] = []
    if rank == 0:
        from vimoe_dist.metrics.jsonl import JsonlSink
        from vimoe_dist.metrics.progress import ProgressSink

        try:
            sinks.append(JsonlSink(Path(run_dir), start_step))
        except BaseException:
            prometheus.close()
            raise
        if cfg.train.progress:
            sinks.append(ProgressSink(total_steps, start_step, stream=stream))
    sinks.append(prometheus)
    return Metrics(sinks, prometheus, rank)


def config_hash(cfg: Config) -> str:
    """12 hex digits of SHA-256 over the resolved config, leaving out what does not change what is trained (the
    `metrics` section, `run.out_dir`, `run.resume`), so the runs of one experiment share a hash in Grafana."""
    from vimoe_dist.config import to_dict

    data = to_dict(cfg)
    data.pop("metrics", None)
    data["run"].pop("out_dir", None)
    data["run"].pop("resume", None)
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
