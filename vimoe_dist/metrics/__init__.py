"""Training metrics: `metrics.jsonl` and a progress bar on rank 0, TensorBoard and Weights & Biases on rank 0 when
asked, Prometheus series on every rank, plots.

The trainer passes plain Python numbers; nothing here imports torch (TensorBoard's writer does, when it is on). The
API it calls:

    from vimoe_dist.metrics import build_metrics

    metrics = build_metrics(cfg, rank=rank, local_rank=local_rank, world_size=world_size, run_dir=run_dir,
                            total_steps=cfg.train.steps, start_step=start_step)
    metrics.publish_targets()                 # collective, once the process group exists: every rank's host:port
                                              # into RUN_DIR/prometheus_targets.json (nothing when metrics.port is 0)
    metrics.load_state_dict(saved)           # on resume: counter totals from the checkpoint (never decrease)
    for step in ...:
        metrics.on_step(step, images=n, step_seconds=t, data_wait_seconds=w, alltoall_seconds=a)  # every step
        metrics.on_log(record)                # every train.log_every steps
        metrics.on_eval(record)               # after an evaluation
        if metrics.accepts_images:            # TensorBoard or W&B is on (rank 0): draw only then
            metrics.on_image("routing/block_10", figure_or_png_or_array, step)
        metrics.on_checkpoint(step, seconds)  # after a checkpoint; store metrics.state_dict() in it
        metrics.on_event("expert_collapse", step=step, layer=10)  # a warning
    metrics.close()                           # push to the Pushgateway if configured, stop the server, close files,
                                              # finish the W&B run, empty the targets file

Tracking never stops training: a sink that fails (a full disk under TensorBoard, W&B gone) logs one warning and is
closed; a full disk under `metrics.jsonl` is one warning, no torn line, and writing resumes when space comes back.
TensorBoard (`metrics.tensorboard: true`, `RUN/tb/`) and W&B (`metrics.wandb: {project, mode, ...}`) show the same
names (`tracking.py`); their packages are optional extras (`pip install 'vimoe-dist[tensorboard]'`, `[wandb]`).

`on_step` is the hot path: it adds to a few floats and one histogram bucket, with no I/O, no lock and no collective.
Its `images` are the images this rank consumed in the step; `step_seconds` its wall time; `data_wait_seconds` the
time spent waiting for the batch; `alltoall_seconds` the time in expert-parallel all-to-all (0 when not measured).

`on_log(record)` takes:
    {"step", "loss", "lr", "images_per_sec", "grad_norm", "step_seconds", "data_wait_seconds",
     "alltoall_seconds",  # per step, mean over the interval
     "tokens_per_sec", "flops_per_image", "achieved_tflops", "mfu",  # model FLOPs (train/efficiency.py)
     "gpu_allocated_bytes", "gpu_reserved_bytes", "gpu_peak_allocated_bytes",  # this rank's GPU; absent on CPU
     "bad_samples",   # cumulative count on this rank
     "moe": {"<block index>": {"tokens": [per expert], "dropped": int, "entropy": float, "imbalance": float}}}
where `tokens` and `dropped` count the token assignments (a token sent to k experts counts k times) of this rank
since the previous `on_log`; `entropy` is the router's mean entropy and `imbalance` max/mean tokens per expert over
that interval (computed from `tokens` when missing). Missing keys are skipped.
`on_eval(record)` takes {"step", "eval_top1", "eval_top5", "eval_loss", "images"} (accuracies as ratios in [0, 1]).

Checkpoints: `state_dict()` is this rank's counter totals. Every rank has its own, so save them all (e.g.
`torch.distributed.all_gather_object` at checkpoint time, stored by rank 0) and pass either this rank's dict or the
whole list to `load_state_dict`, once, before the first step of the resumed run.

Prometheus: rank r serves `http://metrics.addr:(metrics.port + LOCAL_RANK)/metrics` (`metrics.port: 0` opens no
port; the shipped ImageNet configs use 19400, outside 9100-9999 where the exporters of a GPU node live: dcgm 9400,
node 9100). The address defaults to 127.0.0.1 because the endpoint has no authentication: an operator who wants
Prometheus on another host to scrape the nodes sets `metrics.addr=0.0.0.0` (or the node's cluster address) on a
network they trust, and rank 0 logs one warning saying so. The endpoint answers only `/metrics`, and only with the
series below. A taken port is one warning and the next free port is used (`metrics.port_search: false` makes it a
`UserError` naming it); `RUN_DIR/prometheus_targets.json` lists the ports actually bound (`targets.py`). Series,
each with labels `job` (`metrics.job`) and `rank`:

    vimoe_build_info{version, config_hash, world_size, ep_size, backbone, router}
    vimoe_train_steps_total, vimoe_train_images_total, vimoe_train_step, vimoe_train_steps_target,
    vimoe_train_last_step_timestamp_seconds, vimoe_train_step_seconds (histogram),
    vimoe_train_loss, vimoe_train_lr, vimoe_train_grad_norm, vimoe_train_images_per_second,
    vimoe_train_tokens_per_second, vimoe_train_flops_per_image, vimoe_train_flops_per_second, vimoe_train_mfu,
    vimoe_gpu_memory_allocated_bytes, vimoe_gpu_memory_reserved_bytes, vimoe_gpu_memory_peak_allocated_bytes,
    vimoe_data_wait_seconds_total, vimoe_data_bad_samples_total, vimoe_alltoall_seconds_total,
    vimoe_moe_tokens_total{layer, expert}, vimoe_moe_dropped_tokens_total{layer},
    vimoe_moe_load_imbalance{layer}, vimoe_moe_router_entropy{layer},
    vimoe_eval_top1, vimoe_eval_top5, vimoe_eval_loss,
    vimoe_checkpoint_seconds, vimoe_checkpoint_step, vimoe_checkpoint_saves_total, vimoe_events_total{event},
    vimoe_process_resident_memory_bytes, vimoe_process_peak_resident_memory_bytes

`vimoe_dist/launch/monitoring/` (`vimoe launch monitoring --out DIR`) holds a Grafana dashboard over these series
and a Prometheus scrape config for a Slurm job (one target per rank). `vimoe plot RUN_DIR` draws the curves of a
run from its `metrics.jsonl`; `vimoe metrics targets` prints a run's targets file. `progress.track` shows the
progress of other long loops (eval, analysis).
"""

from __future__ import annotations

from vimoe_dist.metrics.base import Metrics, MetricsSink
from vimoe_dist.metrics.build import build_metrics

__all__ = ["Metrics", "MetricsSink", "build_metrics"]
