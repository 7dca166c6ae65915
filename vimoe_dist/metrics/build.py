"""`build_metrics`: the one place the `metrics` config becomes sinks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vimoe_dist import __version__
from vimoe_dist.errors import UserError
from vimoe_dist.metrics.base import Metrics, MetricsSink, one_line
from vimoe_dist.metrics.server import is_loopback

if TYPE_CHECKING:
    from vimoe_dist.config import Config

log = logging.getLogger(__name__)


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
    """The sinks of one rank: rank 0 writes `run_dir/metrics.jsonl`, shows progress (`train.progress`) and, when
    asked, writes TensorBoard (`metrics.tensorboard`) and W&B (`metrics.wandb`); every rank keeps the Prometheus
    series and serves them on `metrics.addr:metrics.port + local_rank` (port 0: none; a taken port: the next free
    one, with a warning, unless `metrics.port_search` is false).

    Args:
        cfg: the validated run config.
        rank, local_rank, world_size: this process's place in the job.
        run_dir: the run directory (`run.out_dir`).
        total_steps: `train.steps`, for the progress bar, the ETA and `vimoe_train_steps_target`.
        start_step: the step a resumed run starts from (0 for a new run).
        stream: where the progress goes (stderr by default).

    Raises:
        UserError: the port is taken (with `metrics.port_search: false`), `metrics.addr` cannot be bound, the run
            directory cannot be written, or TensorBoard / W&B is asked for without its package. W&B failing to
            start (no network, no API key) is a warning, not an error.
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
    try:
        if rank == 0:
            _rank0_sinks(cfg, Path(run_dir), total_steps, start_step, stream, sinks)
    except BaseException:
        for sink in (*sinks, prometheus):
            with contextlib.suppress(Exception):
                sink.close()
        raise
    if rank == 0 and m.port and not is_loopback(m.addr):
        log.warning(
            "metrics.addr %s: the /metrics endpoints have no authentication; anyone who can reach this host can read "
            "them (use it on a network you trust, or metrics.addr=127.0.0.1)", m.addr,
        )  # fmt: skip
    sinks.append(prometheus)
    return Metrics(sinks, prometheus, rank, run_dir)


def _rank0_sinks(
    cfg: Config, run_dir: Path, total_steps: int, start_step: int, stream: TextIO | None, sinks: list[MetricsSink]
) -> None:
    """metrics.jsonl, the progress, TensorBoard and W&B, appended to `sinks` as they start."""
    from vimoe_dist.config import to_dict
    from vimoe_dist.metrics.jsonl import JsonlSink
    from vimoe_dist.metrics.progress import ProgressSink
    from vimoe_dist.metrics.wandb_sink import wandb_enabled

    m = cfg.metrics
    check_trackers(cfg)  # before anything is written
    sinks.append(JsonlSink(run_dir, start_step))
    if cfg.train.progress:
        sinks.append(ProgressSink(total_steps, start_step, stream=stream))
    if m.tensorboard:
        from vimoe_dist.metrics.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(run_dir, start_step, to_dict(cfg)))
    if wandb_enabled(m.wandb):
        from vimoe_dist.metrics.wandb_sink import WandbSink

        try:
            sinks.append(WandbSink(m.wandb, run_dir, start_step, to_dict(cfg)))
        except UserError:
            raise
        except Exception as e:  # no network, no API key, a W&B outage: tracking never stops training
            log.warning("metrics.wandb: W&B did not start (%s); training goes on without it", one_line(e))


def check_trackers(cfg: Config) -> None:
    """Raises the one-line `UserError` for TensorBoard or W&B asked for without its package. Imports neither, so a
    launcher or `vimoe config show` can run it before any rank starts; `build_metrics` runs it on rank 0."""
    from vimoe_dist.metrics import tensorboard_sink, wandb_sink

    if cfg.metrics.tensorboard:
        tensorboard_sink.require_package()
    if wandb_sink.wandb_enabled(cfg.metrics.wandb):
        wandb_sink.require_package()


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
