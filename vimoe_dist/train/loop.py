"""The training job, top to bottom: setup, build, parallelize, engine, resume, loop, evaluate, checkpoint.
`train` below is the whole of it; each step is `train_step` (train/step.py), and what happens between steps
(logging, stop, eval, checkpoint, the end) is named in train/boundary.py.

One process is one rank; the same code serves every launcher:

    vimoe train --config configs/digits.yaml                                   # one process
    deepspeed --num_gpus 2 --module vimoe_dist train --config configs/digits.yaml
    torchrun --nproc-per-node 2 -m vimoe_dist train --config configs/digits.yaml
    srun python -m vimoe_dist train --config configs/digits.yaml               # inside an sbatch script
    vimoe launch local|hostfile|slurm ... --config FILE [key=value ...]        # builds one of the above

Rerunning a command on an existing `run.out_dir` resumes from its latest complete checkpoint (`run.resume: auto`).
One job at a time per run directory: rank 0 locks it, and a second job exits 2 naming the first (train/rundir.py).

Faults (tests/faults/ injects each one into real runs):
- a crash in the middle of a checkpoint save leaves the previous checkpoint the one resumed (train/checkpoint.py);
- a dead or hung rank: collectives time out after `parallel.timeout_s` (every process group, DeepSpeed's expert
  groups included), the survivors name the missing ranks (parallel/peers.py) and exit 1; torchrun `--max-restarts` or a
  Slurm requeue restarts the job, which resumes;
- SIGTERM / SIGUSR1 / SIGINT: checkpoint at the next step boundary (or at once, from inside an evaluation), exit 75
  (130 after a Ctrl-C; a second Ctrl-C exits at once); before the first finite step, nothing to save: exit 143/130 (75
  for SIGUSR1) at once, wherever the process is (train/signals.py);
- a non-finite loss: every rank skips the update; the log and a `nonfinite_loss` event name the step and the cause
  (the input batch, the patch embedding, or the MoE block whose router went bad: train/nonfinite.py); weights with a
  NaN are never saved; `train.max_bad_steps` in a row stop the run; a job whose every step was non-finite exits 2
  and saves nothing;
- a full or read-only checkpoint directory: one error naming it, the last good checkpoint kept;
- a data loader that fails on one rank (past `data.max_bad_fraction`, an unreadable shard): every rank stops at
  that step with one line, the failed rank's naming the shards (train/step.py, placeholder_batch);
- expert collapse: a warning and an `expert_collapse` event naming the block (train/monitor.py).
"""

from __future__ import annotations

import logging

from vimoe_dist.config import Config
from vimoe_dist.data import build_train_loader, build_val_loader
from vimoe_dist.metrics import build_metrics
from vimoe_dist.model import build_model, moe_layers
from vimoe_dist.parallel.device import resolve_device
from vimoe_dist.parallel.engine import unwrap
from vimoe_dist.parallel.env import resolve_env
from vimoe_dist.parallel.init import init_distributed
from vimoe_dist.parallel.parallelize import parallelize
from vimoe_dist.parallel.peers import describe_failure, is_collective_failure
from vimoe_dist.preflight import check_device, preflight
from vimoe_dist.train import checkpoint
from vimoe_dist.train.boundary import (
    StopDuringEval,
    after_step,
    at_step_boundary,
    checkpoint_and_requeue,
    finish,
    log_interval,
)
from vimoe_dist.train.fault_hooks import build_fault_hooks
from vimoe_dist.train.job import Job
from vimoe_dist.train.monitor import RoutingMonitor
from vimoe_dist.train.nonfinite import NonFiniteWatch
from vimoe_dist.train.rundir import claim_run_dir, write_run_files
from vimoe_dist.train.setup import (
    announce,
    build_criterion,
    build_engine,
    prepare_run_dir,
    seed_everything,
    setup_logging,
)
from vimoe_dist.train.signals import StopRequest
from vimoe_dist.train.step import LossInterval, train_step

log = logging.getLogger("vimoe.train")


def train(cfg: Config) -> int:
    """One rank of a training job (see the module docstring); returns the process's exit code."""
    # --- setup: the checks (config, device, layout against the job's size, data), then the rendezvous (a bad input
    # never waits for one)
    env = resolve_env()
    setup_logging(env.rank)
    device = resolve_device(cfg.run.device, env.local_rank, one_gpu_per_task=env.source == "slurm")
    ready = preflight(cfg, env.world_size, device=device)
    stop = StopRequest(env.rank)  # from here on SIGTERM/SIGINT/SIGUSR1 stop the job at any point
    init_distributed(cfg, env, device)
    claim_run_dir(cfg.run.out_dir, env.rank)  # one job per run directory: a second one exits 2 on every rank
    run_dir = prepare_run_dir(cfg, env.rank)
    announce(cfg, env, device, check_device(cfg, device), ready.data)  # rank 0's start-up line
    # a bad resume path and a taken metrics port fail before anything is built
    resume_from = checkpoint.find_resume(cfg, run_dir / "checkpoints")
    val_loader = build_val_loader(cfg, env.rank, env.world_size) if cfg.data.val else None
    metrics = build_metrics(
        cfg, rank=env.rank, local_rank=env.local_rank, world_size=env.world_size, run_dir=run_dir,
        total_steps=cfg.train.steps, start_step=checkpoint.step_of(*resume_from) if resume_from else 0,
    )  # fmt: skip
    job = None
    try:
        metrics.publish_targets()  # every rank's actual metrics host:port into RUN/prometheus_targets.json
        # --- build (the same initial weights on every rank), parallelize, engine
        seed_everything(cfg.run.seed)
        model = build_model(cfg.model, trust_checkpoint=cfg.run.trust_checkpoint)
        model = parallelize(model, cfg.parallel.ep_size)  # from here on, MoE FFNs send tokens to other ranks' experts
        engine, optimizer, scheduler = build_engine(model, cfg, env.world_size)

        # --- resume: weights, optimizer, step, data position, metric totals; then config.yaml and classes.txt
        start_step, rank_state = checkpoint.resume(engine, cfg, resume_from, env) if resume_from else (0, {})
        write_run_files(cfg, run_dir, env.world_size, resume_from, ready.data.classes)
        train_loader = build_train_loader(cfg, env.rank, env.world_size, start_step=start_step,
                                          state=rank_state.get("data"))  # fmt: skip
        if rank_state.get("metrics"):
            metrics.load_state_dict(rank_state["metrics"])
        layers = moe_layers(unwrap(engine))
        job = Job(cfg, env, run_dir, engine, optimizer, scheduler, build_criterion(cfg), train_loader, val_loader,
                  metrics, RoutingMonitor(cfg, layers), build_fault_hooks(run_dir, env.rank, layers), stop,
                  device, NonFiniteWatch(unwrap(engine)))  # fmt: skip

        # --- loop: a step, its log line, then the step boundary (stop, eval, checkpoint)
        step, bad_steps, interval = start_step, 0, LossInterval(job.device)
        batches = iter(train_loader)
        while step < cfg.train.steps:
            job.hooks.before_step(step + 1)
            outcome = train_step(job, batches, step, interval)
            step += 1
            bad_steps = after_step(job, step, outcome, bad_steps)
            if job.logs_at(step):
                log_interval(job, step, interval, outcome.data_wait)
            code = at_step_boundary(job, step, outcome.stop)
            if code is not None:
                return code
        return finish(job, step, start_step)
    except StopDuringEval as e:
        return checkpoint_and_requeue(job, e.step, " during the evaluation")
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        log.error("%s", describe_failure(env.rank, env.world_size, cfg.parallel.timeout_s, e))
        return 1
    finally:
        metrics.close()
