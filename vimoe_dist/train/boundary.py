"""What happens between two steps: logging, stopping (a signal, `train.stop_at`), evaluating and checkpointing, and
the end of the run. Each is a collective where it says so: every rank reaches the same boundary at the same step."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import torch

from vimoe_dist.errors import UserError
from vimoe_dist.metrics.base import one_line
from vimoe_dist.parallel.checkpoint_layout import tag_for
from vimoe_dist.parallel.collectives import all_reduce_mean
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.train import checkpoint
from vimoe_dist.train.eval_routing import EvalRouting, class_names_of
from vimoe_dist.train.evaluate import evaluate
from vimoe_dist.train.job import Job
from vimoe_dist.train.rundir import write_run_file
from vimoe_dist.train.signals import EXIT_REQUEUE, exit_code
from vimoe_dist.train.step import LossInterval, StepOutcome

log = logging.getLogger("vimoe.train")


class StopDuringEval(Exception):
    """A preemption request arrived during an evaluation after `step`: checkpoint that step and exit for requeue."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


def after_step(job: Job, step: int, outcome: StepOutcome, bad_steps: int) -> int:
    """Counts a skipped step (naming the router that went bad: a collective), steps the schedule, accumulates the MoE
    statistics and reports the step to the metrics; returns the number of skipped steps in a row."""
    t = job.cfg.train
    if outcome.skipped:
        bad_steps += 1
        # every rank names the same cause: the input or the embedding first, else the first router that broke
        where = job.nonfinite.source(job.env.rank, job.env.world_size)
        layer = None
        if not where:
            where, layer = job.monitor.bad_router(job.env.rank, job.env.world_size), job.monitor.bad_block
        job.first_bad = job.first_bad or where
        log.warning("step %d: non-finite loss, update skipped%s", step, f" ({where})" if where else "")
        job.metrics.on_event("nonfinite_loss", step=step, layer=layer, detail=where or None)
        if bad_steps > t.max_bad_steps:
            raise UserError(
                f"train.max_bad_steps: {bad_steps} consecutive non-finite losses up to step {step}"
                f"{f' ({where})' if where else ''}; last good checkpoint {checkpoint.latest_tag(job.ckpt_root)}"
            )
    else:
        bad_steps = 0
        job.finite_steps += 1
        job.stop.arm()  # there is something to save now: a stop signal checkpoints (train/signals.py)
    job.scheduler.step_update(step)
    if not outcome.skipped:
        job.monitor.accumulate()
    job.metrics.on_step(step, images=outcome.images * t.grad_accum, step_seconds=time.perf_counter() - outcome.started,
                        data_wait_seconds=outcome.data_wait,
                        alltoall_seconds=job.monitor.take_alltoall_seconds())  # fmt: skip
    return bad_steps


def log_interval(job: Job, step: int, interval: LossInterval, data_wait: float) -> None:
    """The log record of the steps since the last one: the loss averaged over ranks (a collective, which also
    averages the routed experts' FLOPs), lr, throughput, gradient norm, all-to-all time, model FLOPs and MFU, GPU
    memory, bad samples and the MoE statistics; then a fresh interval. Throughput and MFU count the steps' own time
    (`interval.seconds`), not the evaluations and checkpoints between them."""
    world = job.env.world_size
    seconds = interval.seconds
    means = torch.stack([(interval.loss_sum / max(interval.count, 1)).double(), job.efficiency.take_expert_flops()])
    mean_loss, expert_flops = all_reduce_mean(means).tolist()
    group = job.optimizer.param_groups[0]
    images_per_sec = interval.images * world / max(seconds, 1e-9)
    job.metrics.on_log({
        "step": step,
        "loss": mean_loss if interval.count else float("nan"),
        "lr": group["lr"] / group.get("lr_scale", 1.0),
        "images_per_sec": images_per_sec,
        "grad_norm": job.grad_norm.take(),
        "step_seconds": seconds / max(interval.steps, 1),
        "data_wait_seconds": data_wait,
        "alltoall_seconds": job.monitor.alltoall_seconds_per_step(),
        **job.efficiency.record(seconds, expert_flops, images_per_sec),
        "bad_samples": job.train_loader.num_bad,
        "moe": job.monitor.report(step, job.metrics),
    })  # fmt: skip
    interval.reset()


def at_step_boundary(job: Job, step: int, stop: int) -> int | None:
    """Stop (`stop`, a signal number: checkpoint and exit for requeue, or 130 after a Ctrl-C; `train.stop_at`:
    checkpoint and exit 0), evaluate, checkpoint, as the config asks at `step`; returns the exit code when the run
    ends here."""
    t = job.cfg.train
    if stop:
        return checkpoint_and_requeue(job, step, signum=stop)
    if t.stop_at and step == t.stop_at and step < t.steps:
        refuse_no_finite_step(job, step)
        log.info("train.stop_at=%d reached: checkpointing and stopping; rerun the command to continue", step)
        save(job, step)
        return 0
    if t.eval_every and step % t.eval_every == 0 and step < t.steps:
        run_eval(job, step)
    if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
        save(job, step)
    return None


def finish(job: Job, step: int, start_step: int) -> int:
    """The final evaluation (`eval.json`) and checkpoint (unless a rerun of a finished run found it already there).

    Raises:
        UserError: every step of this job had a non-finite loss (nothing is saved: the weights are those it started
            from, and a checkpoint would present them as the result), or `eval.json` cannot be written.
    """
    if start_step < step:
        refuse_no_finite_step(job, step)
    result = run_eval(job, step)
    if start_step < job.cfg.train.steps or checkpoint.latest_tag(job.ckpt_root) != tag_for(step):
        save(job, step)
    if job.env.is_main and result is not None:
        write_run_file(job.run_dir / "eval.json", json.dumps(result) + "\n")  # the checkpoint is saved already
        log.info("final top-1 %.4f top-5 %.4f loss %.4f on %d images; run directory %s",
                 result["top1"], result["top5"], result["loss"], result["images"], job.run_dir)  # fmt: skip
    return 0


def refuse_no_finite_step(job: Job, step: int) -> None:
    """A job whose every step had a non-finite loss has no result: one error naming the first cause, nothing saved.

    Raises:
        UserError: when no step of this job up to `step` was finite.
    """
    if job.finite_steps == 0:
        raise UserError(
            f"no finite step: the loss was not finite in any step of this job up to step {step} "
            f"({job.first_bad or 'see the warnings above'}); nothing saved, "
            f"{checkpoint.latest_tag(job.ckpt_root) or 'no checkpoint'} stays the latest"
        )


def save(job: Job, step: int) -> None:
    """A checkpoint of `step` (collective; train/checkpoint.py), with this rank's data position and metric totals;
    none while this job has not taken a finite step (the weights are still those it started from)."""
    if job.finite_steps == 0:
        log.warning("step %d: not checkpointing, no step of this job had a finite loss yet", step)
        return
    t0 = time.perf_counter()
    client = {"step": step, "ep_size": job.cfg.parallel.ep_size, "world_size": job.env.world_size}
    rank_file = {"data": job.train_loader.state_dict(), "metrics": job.metrics.state_dict(), "step": step}
    saved = checkpoint.save(job.engine, job.ckpt_root, step, client, rank_file, job.cfg.train.keep_checkpoints,
                            fault_point=job.hooks.in_save)  # fmt: skip
    if saved:
        job.metrics.on_checkpoint(step, time.perf_counter() - t0)
    else:
        job.metrics.on_event("checkpoint_refused_nonfinite", step=step)


def run_eval(job: Job, step: int) -> dict | None:
    """An evaluation over the whole validation set (collective), or None without one. When a tracker takes images
    (rank 0), the routing of the evaluation batches is drawn as heatmaps for it (train/eval_routing.py)."""
    if job.val_loader is None:
        return None
    job.hooks.before_eval(step)
    routing = EvalRouting(job.monitor.layers, job.cfg.model.num_classes) if wants_heatmaps(job) else None
    with routing or contextlib.nullcontext():
        result = evaluate(
            unwrap(job.engine), job.val_loader, job.device, job.dtype, should_stop=lambda: job.stop.requested,
            on_batch=routing.update if routing else None, progress=job.env.is_main and job.cfg.train.progress,
        )  # fmt: skip
    job.monitor.discard_alltoall_seconds()  # the evaluation's all-to-all time is no training step's
    if result is None:  # a stop request during the evaluation: every rank left it at the same batch
        raise StopDuringEval(step)
    job.metrics.on_eval({"step": step, "eval_top1": result["top1"], "eval_top5": result["top5"],
                         "eval_loss": result["loss"], "images": result["images"]})  # fmt: skip
    if routing is not None:
        send_heatmaps(job, routing, step)
    return result


def wants_heatmaps(job: Job) -> bool:
    return bool(job.monitor.layers) and job.metrics.accepts_images


def send_heatmaps(job: Job, routing: EvalRouting, step: int) -> None:
    """Draws the heatmaps into `RUN/routing/<step tag>/` and hands them to the trackers; a failure is one warning
    (tracking never stops training)."""
    try:
        paths = routing.draw(job.run_dir / "routing" / tag_for(step), step, class_names_of(job.cfg))
    except Exception as e:
        log.warning("metrics: the routing heatmaps of step %d were not drawn (%s)", step, one_line(e))
        return
    for tag, path in paths.items():
        job.metrics.on_image(tag, path, step)


def checkpoint_and_requeue(job: Job, step: int, during: str = "", signum: int | None = None) -> int:
    """A stop request (a signal here or on another rank, `signum` when the ranks agreed on it): checkpoint `step` and
    exit with EXIT_REQUEUE, or 130 after a Ctrl-C."""
    rank, stop = job.env.rank, job.stop
    code = exit_code(signum or stop.signum)
    log.warning("rank %d: %s received%s, checkpointing at step %d and exiting%s", rank,
                stop.signal_name or "stop request from another rank", during, step,
                " for requeue" if code == EXIT_REQUEUE else "")  # fmt: skip
    save(job, step)
    since = f" {stop.seconds_since():.1f} s after {stop.signal_name}" if stop.requested else ""
    log.warning("rank %d: checkpoint of step %d done%s; exit code %d", rank, step, since, code)
    return code
