"""The training job, top to bottom: setup, build, parallelize, engine, resume, loop, evaluate, checkpoint.

One process is one rank; the same code serves every launcher:

    vimoe train --config configs/digits.yaml                                   # one process
    deepspeed --num_gpus 2 --module vimoe_dist train --config configs/digits.yaml
    torchrun --nproc-per-node 2 -m vimoe_dist train --config configs/digits.yaml
    srun python -m vimoe_dist train --config configs/digits.yaml               # inside an sbatch script
    vimoe launch local|hostfile|slurm ... --config FILE [key=value ...]        # builds one of the above

Rerunning a command on an existing `run.out_dir` resumes from its latest complete checkpoint (`run.resume: auto`).

Faults (tests/faults/ injects each one into real runs):
- a crash in the middle of a checkpoint save leaves the previous checkpoint the one resumed (train/checkpoint.py);
- a dead or hung rank: collectives time out after `parallel.timeout_s` (every process group, DeepSpeed's expert
  groups included), the survivors name the missing ranks (train/peers.py) and exit 1; torchrun `--max-restarts` or a
  Slurm requeue restarts the job, which resumes;
- SIGTERM / SIGUSR1: checkpoint at the next step boundary (or at once, from inside an evaluation), exit 75
  (train/signals.py);
- a non-finite loss: every rank skips the update; the log and a `nonfinite_loss` event name the step and the MoE
  block whose router went bad; weights with a NaN are never saved; `train.max_bad_steps` in a row stop the run;
- a full or read-only checkpoint directory: one error naming it, the last good checkpoint kept;
- a data loader that fails on one rank (past `data.max_bad_fraction`, an unreadable shard): every rank stops at
  that step with one line, the failed rank's naming the shards (placeholder_batch);
- expert collapse: a warning and an `expert_collapse` event naming the block (RoutingMonitor).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vimoe_dist.config import Config, ConfigError, check_layout, save_config
from vimoe_dist.errors import UserError
from vimoe_dist.train.monitor import RoutingMonitor
from vimoe_dist.train.signals import EXIT_REQUEUE, StopRequest

log = logging.getLogger("vimoe.train")


def train(cfg: Config) -> int:
    from vimoe_dist.data import build_train_loader, build_val_loader
    from vimoe_dist.data.loader import resolve_split
    from vimoe_dist.metrics import build_metrics
    from vimoe_dist.parallel.init import init_distributed
    from vimoe_dist.train import checkpoint
    from vimoe_dist.train.fault_hooks import build_fault_hooks
    from vimoe_dist.train.peers import describe_failure, is_collective_failure

    # --- setup: who am I, is the layout possible, where does the run live
    check_config(cfg)
    stop = StopRequest()
    env = init_distributed(cfg)
    rank, world = env.rank, env.world_size
    setup_logging(rank)
    check_layout(cfg, world)
    run_dir = prepare_run_dir(cfg, rank)
    ckpt_root = run_dir / "checkpoints"
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    # fail on bad data paths and a taken metrics port before building anything
    resume_tag = find_resume(cfg, ckpt_root)
    resolve_split(cfg, "data.train", need_counts=False)
    val_loader = build_val_loader(cfg, rank, world) if cfg.data.val else None
    metrics = build_metrics(
        cfg, rank=rank, local_rank=env.local_rank, world_size=world, run_dir=run_dir,
        total_steps=cfg.train.steps, start_step=checkpoint.step_of(*resume_tag) if resume_tag else 0,
    )  # fmt: skip
    try:
        # --- build, parallelize, engine
        engine, optimizer, scheduler = build_engine(cfg, world, run_dir if rank == 0 else None)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision, torch.float32)

        # --- resume: weights, optimizer, step, data position, metric totals
        start_step, rank_state = 0, {}
        if resume_tag is not None:
            start_step, rank_state = resume(engine, cfg, resume_tag, rank, world)
        train_loader = build_train_loader(cfg, rank, world, start_step=start_step, state=rank_state.get("data"))
        if rank_state.get("metrics"):
            metrics.load_state_dict(rank_state["metrics"])
        criterion = build_criterion(cfg)
        moe = {i: m for i, m in enumerate(engine.module.blocks) if hasattr(m.mlp, "aux_loss")}
        monitor = RoutingMonitor(cfg, moe)
        hooks = build_fault_hooks(run_dir, rank, moe)  # None unless VIMOE_TEST_FAULTS is set (tests/faults/)

        def save(step: int) -> None:
            t0 = time.perf_counter()
            client = {"step": step, "ep_size": cfg.parallel.ep_size, "world_size": world}
            rank_file = {"data": train_loader.state_dict(), "metrics": metrics.state_dict(), "step": step}
            saved = checkpoint.save(engine, ckpt_root, step, client, rank_file, cfg.train.keep_checkpoints,
                                    fault_point=hooks.in_save if hooks else None)  # fmt: skip
            if saved:
                metrics.on_checkpoint(step, time.perf_counter() - t0)
            else:
                metrics.on_event("checkpoint_refused_nonfinite", step=step)

        def run_eval(step: int) -> dict | None:
            if val_loader is None:
                return None
            if hooks is not None:
                hooks.before_eval(step)
            result = evaluate(engine, val_loader, device, dtype, should_stop=lambda: stop.requested)
            if result is None:  # a stop request during the evaluation: every rank left it at the same batch
                raise _StopDuringEval(step)
            metrics.on_eval({"step": step, "eval_top1": result["top1"], "eval_top5": result["top5"],
                             "eval_loss": result["loss"], "images": result["images"]})  # fmt: skip
            return result

        def checkpoint_and_requeue(step: int, during: str = "") -> int:
            log.warning("rank %d: %s received%s, checkpointing at step %d and exiting for requeue", rank,
                        stop.signal_name or "stop request from another rank", during, step)  # fmt: skip
            save(step)
            since = f" {stop.seconds_since():.1f} s after {stop.signal_name}" if stop.requested else ""
            log.warning("rank %d: checkpoint of step %d done%s; exit code %d", rank, step, since, EXIT_REQUEUE)
            return EXIT_REQUEUE

        # --- loop
        t = cfg.train
        step, bad_steps, images_seen = start_step, 0, 0
        loss_sum = torch.zeros((), device=device)
        loss_count, interval_t0 = 0, time.perf_counter()
        batches = iter(train_loader)
        while step < t.steps:
            if hooks is not None:
                hooks.before_step(step + 1)
            step_t0 = time.perf_counter()
            seed_step(cfg.run.seed, step, rank)
            data_wait, skipped = 0.0, False
            for _ in range(t.grad_accum):
                t_wait = time.perf_counter()
                try:
                    batch, data_error = next(batches), None
                except Exception as e:  # re-raised below, once every rank knows (see placeholder_batch)
                    batch, data_error = placeholder_batch(cfg, world), e
                data_wait += time.perf_counter() - t_wait
                images = batch["image"].to(device, non_blocking=True).to(dtype)
                target = batch.get("target", batch["label"]).to(device, non_blocking=True)
                logits = engine(images)
                loss = criterion(logits.float(), target) + monitor.aux_loss()
                # every rank must agree to skip a bad step (the gradient all-reduce is collective), to stop, and to
                # end the run when one rank's data failed
                failed_code = float(rank + 1 if data_error is not None else 0)
                status = torch.tensor([float(stop.requested), failed_code], device=device)
                flags = torch.cat([(~torch.isfinite(loss.detach())).float().view(1), status])
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                bad, stop_now, failed = flags.tolist()
                if failed:
                    if data_error is not None:
                        raise data_error
                    raise UserError(f"stopping with rank {int(failed) - 1}, whose training data failed (see its error)")
                if bad:
                    skipped = True
                    break
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach()
                loss_count += 1
                images_seen += images.shape[0]
            step += 1
            if skipped:
                bad_steps += 1
                where = monitor.bad_router(rank, world)  # collective: every rank names the same block
                log.warning("step %d: non-finite loss, update skipped%s", step, f" ({where})" if where else "")
                metrics.on_event("nonfinite_loss", step=step, layer=monitor.bad_block, detail=where or None)
                if bad_steps > t.max_bad_steps:
                    raise UserError(
                        f"train.max_bad_steps: {bad_steps} consecutive non-finite losses up to step {step}"
                        f"{f' ({where})' if where else ''}; last good checkpoint {checkpoint.latest_tag(ckpt_root)}"
                    )
            else:
                bad_steps = 0
            scheduler.step_update(step)
            if not skipped:
                monitor.accumulate()
            metrics.on_step(step, images=images.shape[0] * t.grad_accum, step_seconds=time.perf_counter() - step_t0,
                            data_wait_seconds=data_wait, alltoall_seconds=monitor.take_alltoall_seconds())  # fmt: skip

            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - interval_t0
                mean_loss = loss_sum / max(loss_count, 1)
                dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG if dist.get_backend() != "gloo" else dist.ReduceOp.SUM)
                if dist.get_backend() == "gloo":
                    mean_loss /= world
                grad_norm = engine.get_global_grad_norm()
                record = {
                    "step": step,
                    "loss": mean_loss.item() if loss_count else float("nan"),
                    "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                    "images_per_sec": images_seen * world / max(elapsed, 1e-9),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "step_seconds": elapsed / max(loss_count / t.grad_accum, 1),
                    "data_wait_seconds": data_wait,
                    "bad_samples": train_loader.num_bad,
                    "moe": monitor.report(step, metrics),
                }
                metrics.on_log(record)
                loss_sum.zero_()
                loss_count, images_seen, interval_t0 = 0, 0, time.perf_counter()
            if stop_now:
                return checkpoint_and_requeue(step)
            if t.stop_at and step == t.stop_at and step < t.steps:
                log.info("train.stop_at=%d reached: checkpointing and stopping; rerun the command to continue", step)
                save(step)
                return 0
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                run_eval(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                save(step)

        # --- the end: final evaluation and checkpoint
        result = run_eval(step)
        if start_step < t.steps or checkpoint.latest_tag(ckpt_root) != checkpoint.tag_for(step):
            save(step)
        if rank == 0 and result is not None:
            (run_dir / "eval.json").write_text(json.dumps(result) + "\n")
            log.info("final top-1 %.4f top-5 %.4f loss %.4f on %d images; run directory %s",
                     result["top1"], result["top5"], result["loss"], result["images"], run_dir)  # fmt: skip
        return 0
    except _StopDuringEval as e:
        return checkpoint_and_requeue(e.step, " during the evaluation")
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        log.error("%s", describe_failure(rank, world, cfg.parallel.timeout_s, e))
        return 1
    finally:
        metrics.close()


# ------------------------------------------------------------------------------------------------- helpers


def build_engine(cfg: Config, world: int, run_dir: Path | None = None):
    """Build (identical initial weights on every rank), parallelize (experts sharded, all-to-all dispatch), and
    wrap in the DeepSpeed engine with our optimizer and schedule. Returns (engine, optimizer, scheduler)."""
    import deepspeed

    from vimoe_dist.model import build_model
    from vimoe_dist.parallel.ds_config import build_ds_config
    from vimoe_dist.parallel.parallelize import parallelize
    from vimoe_dist.train.optim import build_optimizer, build_scheduler

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, trust_checkpoint=cfg.run.trust_checkpoint)
    model = parallelize(model, cfg.parallel.ep_size)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    ds_config = build_ds_config(cfg, world)
    if run_dir is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer, scheduler


def check_config(cfg: Config) -> None:
    """Checks that need no process group, before anything starts (build_model makes the same file check later)."""
    if cfg.data.train is None:
        raise ConfigError("data.train: no training shards configured")
    source = cfg.model.pretrained
    looks_like_file = source is not None and ("/" in source or source.endswith((".pth", ".pt", ".bin", ".safetensors")))
    if looks_like_file and not Path(source).exists():
        raise ConfigError(f"model.pretrained: file {source!r} does not exist")
    if cfg.parallel.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("parallel.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")


def prepare_run_dir(cfg: Config, rank: int) -> Path:
    """Creates the run directory; both it and `checkpoints/` (often a mount of its own) must take a file."""
    run_dir = Path(cfg.run.out_dir)
    for where in (run_dir, run_dir / "checkpoints"):
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = where / f".write_test_{rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run.out_dir: cannot write to {str(where)!r} ({e.strerror or e})") from None
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def find_resume(cfg: Config, ckpt_root: Path) -> tuple[Path, str] | None:
    from vimoe_dist.train import checkpoint

    mode = cfg.run.resume
    if mode == "never":
        return None
    if mode == "auto":
        tag = checkpoint.latest_tag(ckpt_root)
        return (ckpt_root, tag) if tag else None
    return checkpoint.resolve_checkpoint(mode)


def resume(engine, cfg: Config, where: tuple[Path, str], rank: int, world: int) -> tuple[int, dict]:
    """Loads weights (any ep_size: experts are stored one per file), optimizer state when the expert layout is
    unchanged, and this rank's data position and metric totals when the world size is unchanged."""
    from vimoe_dist.train import checkpoint
    from vimoe_dist.train.peers import is_collective_failure

    root, tag = where
    trust = cfg.run.trust_checkpoint
    if not trust:
        checkpoint.verify_loadable(root, tag)  # DeepSpeed's loader unpickles without restriction
    client_path = root / tag / "mp_rank_00_model_states.pt"
    saved = checkpoint.load_file(client_path, trust) if client_path.is_file() else {}
    same_ep = saved.get("ep_size") == cfg.parallel.ep_size
    if not same_ep and rank == 0:
        log.warning("resuming %s saved at ep_size %s with ep_size %s: weights reshard, optimizer state restarts",
                    tag, saved.get("ep_size"), cfg.parallel.ep_size)  # fmt: skip
    try:
        _, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=same_ep,
                                           load_lr_scheduler_states=False, load_module_strict=True)  # fmt: skip
    except (RuntimeError, KeyError, FileNotFoundError) as e:
        if isinstance(e, RuntimeError) and is_collective_failure(e):
            raise  # a peer died while loading: reported as such by train()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {str(root / tag)!r} does not fit this model or layout: {msg[:300]}") from None
    if client is None:
        raise UserError(f"checkpoint {str(root / tag)!r} could not be loaded")
    step = int(client["step"])
    rank_state = checkpoint.load_rank_state(root, tag, rank) if client.get("world_size") == world else None
    if rank_state is None and rank == 0:
        log.warning("resuming %s with world size %d (saved with %s): data position re-derived from the step",
                    tag, world, client.get("world_size"))  # fmt: skip
    if rank == 0:
        log.info("resumed from %s at step %d", root / tag, step)
    return step, rank_state or {}


class _StopDuringEval(Exception):
    """A preemption request arrived during an evaluation after `step`: checkpoint that step and exit for requeue."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


def placeholder_batch(cfg: Config, world: int) -> dict:
    """A batch of zeros of the right shape for a rank whose data loader just failed.

    Every forward of an expert-parallel model is a collective (the MoE all-to-alls), so a rank cannot simply leave:
    the others would wait in their next all-to-all until the timeout. The failed rank runs this batch instead, the
    per-step flags tell every rank, and all of them stop together with the failed rank's error; the happy path costs
    nothing extra (the flags are all-reduced anyway).
    """
    from vimoe_dist.data.loader import micro_batch_size

    b, m = micro_batch_size(cfg, world), cfg.model
    batch = {"image": torch.zeros(b, m.in_chans, m.img_size, m.img_size), "label": torch.zeros(b, dtype=torch.long)}
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        batch["target"] = torch.zeros(b, m.num_classes)
    return batch


def build_criterion(cfg: Config):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        return SoftTargetCrossEntropy()  # targets already carry label smoothing (timm Mixup)
    if cfg.train.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.train.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def evaluate(engine, val_loader, device, dtype, should_stop=None) -> dict | None:
    from vimoe_dist.train.evaluate import evaluate as _evaluate

    return _evaluate(engine.module, val_loader, device, dtype, should_stop=should_stop)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Randomness of step s (drop-path, router noise) derives from (seed, s, rank) alone: resuming at step s
    replays exactly what an uninterrupted run would have done, with no RNG state to save."""
    torch.manual_seed(((seed * 1_000_003 + step) * 4099 + rank) % 2**64)  # run.seed may be up to 2**63 - 1


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
