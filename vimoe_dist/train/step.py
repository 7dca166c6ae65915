"""One optimizer step: train.grad_accum micro-batches, each a forward, one all-reduce of flags, a backward and
DeepSpeed's step (which applies the update at the last micro-batch); and the loss bookkeeping between two logs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vimoe_dist.config import Config, micro_batch_size
from vimoe_dist.errors import UserError
from vimoe_dist.parallel.collectives import all_reduce_max
from vimoe_dist.train.job import Job


@dataclass
class StepOutcome:
    skipped: bool  # a non-finite loss on some rank: every rank skipped the update
    stop: int  # a stop request reached some rank: its signal number (the highest of all ranks'), else 0
    images: int  # images of the last micro-batch, per rank
    data_wait: float  # seconds spent waiting for batches
    started: float  # perf_counter at the start of the step


@dataclass
class LossInterval:
    """The losses and images of the steps since the last log line, summed on the device without a host sync, and the
    steps' wall time (evaluations and checkpoints between them left out, so throughput and MFU are the training's)."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    count: int = 0
    images: int = 0
    steps: int = 0
    seconds: float = 0.0  # wall time of those steps, data waits included

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.reset()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach()
        self.count += 1
        self.images += images

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.count, self.images, self.steps, self.seconds = 0, 0, 0, 0.0

    def add_step(self, started: float) -> None:
        """A step (applied or skipped) that began at `started` (perf_counter) ends now."""
        self.steps += 1
        self.seconds += time.perf_counter() - started


def train_step(job: Job, batches: Iterator[dict], step: int, interval: LossInterval) -> StepOutcome:
    """Step `step + 1`. Per micro-batch, every rank learns in one all-reduce whether some rank's loss is not finite
    (the update is then skipped by all: the gradient all-reduce is collective), whether some rank was asked to stop,
    and whether some rank's data loader failed (every rank then stops with one line)."""
    cfg, started = job.cfg, time.perf_counter()
    seed_step(cfg.run.seed, step, job.env.rank)
    data_wait, images, stop = 0.0, 0, 0
    for micro in range(cfg.train.grad_accum):
        t_wait = time.perf_counter()
        try:
            batch, data_error = next(batches), None
        except Exception as e:  # re-raised below, once every rank knows (see placeholder_batch)
            batch, data_error = placeholder_batch(cfg, job.env.world_size), e
        data_wait += time.perf_counter() - t_wait
        x = batch["image"].to(job.device, non_blocking=True).to(job.dtype)
        target = batch.get("target", batch["label"]).to(job.device, non_blocking=True)
        images = x.shape[0]
        loss = job.criterion(job.engine(x).float(), target) + job.monitor.aux_loss()
        bad, stop, failed_rank = agree(loss, job.stop.signum or 0, data_error is not None, job.env.rank, job.device)
        if failed_rank is not None:
            if data_error is not None:
                raise data_error
            raise UserError(f"stopping with rank {failed_rank}, whose training data failed (see its error)")
        if bad:
            interval.add_step(started)
            return StepOutcome(skipped=True, stop=stop, images=images, data_wait=data_wait, started=started)
        job.engine.backward(loss)
        if micro == cfg.train.grad_accum - 1 and job.logs_at(step + 1):
            job.grad_norm.capture()  # reduced, not yet clipped (train/grad_norm.py)
        job.engine.step()
        interval.add(loss, images)
    interval.add_step(started)
    return StepOutcome(skipped=False, stop=stop, images=images, data_wait=data_wait, started=started)


def agree(
    loss: torch.Tensor, stop_signal: int, data_failed: bool, rank: int, device: torch.device
) -> tuple[bool, int, int | None]:
    """(a loss is not finite somewhere, the highest stop signal number of any rank or 0, the highest rank whose data
    failed or None): the step's one collective beyond the model's own."""
    status = torch.tensor([float(stop_signal), float(rank + 1 if data_failed else 0)], device=device)
    flags = all_reduce_max(torch.cat([(~torch.isfinite(loss.detach())).float().view(1), status]))
    bad, stop, failed = flags.tolist()
    return bool(bad), int(stop), int(failed) - 1 if failed else None


def placeholder_batch(cfg: Config, world: int) -> dict:
    """A batch of zeros of the right shape for a rank whose data loader just failed.

    Every forward of an expert-parallel model is a collective (the MoE all-to-alls), so a rank cannot simply leave:
    the others would wait in their next all-to-all until the timeout. The failed rank runs this batch instead, the
    per-step flags tell every rank, and all of them stop together with the failed rank's error; the happy path costs
    nothing extra (the flags are all-reduced anyway).
    """
    b, m = micro_batch_size(cfg, world), cfg.model
    batch = {"image": torch.zeros(b, m.in_chans, m.img_size, m.img_size), "label": torch.zeros(b, dtype=torch.long)}
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        batch["target"] = torch.zeros(b, m.num_classes)
    return batch


def seed_step(seed: int, step: int, rank: int) -> None:
    """Randomness of step s (drop-path, router noise) derives from (seed, s, rank) alone: resuming at step s
    replays exactly what an uninterrupted run would have done, with no RNG state to save."""
    torch.manual_seed(((seed * 1_000_003 + step) * 4099 + rank) % 2**64)  # run.seed may be up to 2**63 - 1
