"""`vimoe bench data`: is the data pipeline ever the bottleneck?

Two measurements, side by side in one run:

1. Throughput (images/s of decode + augment + batch) of our WebDataset pipeline (`data.order: stream` and
   `exact`) against torchvision's `ImageFolder` + `DataLoader` reading the very same JPEG files, with the same timm
   training transform, batch size and number of workers. Both run twice, interleaved; the best of each counts.
   Target: the stream at least as fast as ImageFolder (ratio >= 1).
2. Data-wait fraction of a training step (time blocked on `next(loader)` / step time) for one rank at the demo
   setting (configs/digits.yaml) and at a ViT-S setting (224 px, RandAugment, 8 experts in the last 2 blocks),
   forward + backward + AdamW on this machine, with the default order (`exact`). Target: under 5%.
3. What a resume costs to reach its data position, measured here and estimated at ImageNet scale (the settings of
   configs/vimoe_s14_imagenet.yaml, resumed half-way): in the exact order (the default) the position is the step, so
   a resume costs what a fresh start does - one epoch permutation and indexing the tars its first batch touches,
   whatever the step (measured at step 0 and at step 10^6); a stream order that resumed exactly would instead skip,
   in every worker, the samples it had read, by reading their tar headers (the measured header rate).

Results print as a table and go to a JSON file.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from vimoe_dist.config import Config, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def _extract_folder(shards: Path, root: Path) -> None:
    """The JPEGs of the shards as an ImageFolder tree root/<class>/<key>.jpg (the same bytes)."""
    for shard in sorted(shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                label = int(members[key + ".cls"])
                (root / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
                (root / f"c{label:03d}" / f"{key}.jpg").write_bytes(data)


def _worker_cpu_seconds(loader_iter) -> float:
    """User + system CPU seconds of a DataLoader iterator's worker processes so far (from /proc)."""
    total = 0.0
    for worker in getattr(loader_iter, "_workers", []):
        try:
            with open(f"/proc/{worker.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rate(batches, num_batches: int) -> tuple[float, float]:
    """(images per wall second, images per worker CPU second) over `num_batches` batches after a first (warm-up:
    worker start, buffer fill) batch. The CPU rate is what a loader costs; it is far less sensitive than wall time
    to other processes sharing the machine."""
    it = iter(batches)
    next(it)
    cpu0, t0 = _worker_cpu_seconds(_dataloader_iter(batches)), time.perf_counter()
    n = 0
    for batch in itertools.islice(it, num_batches):
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        n += image.shape[0]
    wall, cpu = time.perf_counter() - t0, _worker_cpu_seconds(_dataloader_iter(batches)) - cpu0
    return n / wall, (n / cpu if cpu > 0 else float("nan"))


def _dataloader_iter(batches):
    """The torch DataLoader iterator behind our TrainLoader or a _FolderBatches (its workers are measured)."""
    return batches._it if hasattr(batches, "_it") else batches.loader._iterator


class _FolderBatches:
    """torchvision's ImageFolder + DataLoader, endless (epochs back to back on persistent workers)."""

    def __init__(self, cfg: Config, root: Path, batch_size: int) -> None:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        from vimoe_dist.data.transforms import build_transform

        dataset = ImageFolder(str(root), transform=build_transform(cfg, training=True))
        workers = cfg.data.num_workers
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
            prefetch_factor=cfg.data.prefetch if workers else None, persistent_workers=workers > 0,
        )  # fmt: skip

    def __iter__(self):
        while True:
            yield from self.loader


def throughput(
    work: Path, images: int, size: int, img_size: int, batch: int, workers: int, num_batches: int, rounds: int = 3
) -> dict:
    from vimoe_dist.data.loader import build_train_loader
    from vimoe_dist.data.synthetic import write_synthetic

    shards = work / "shards"
    write_synthetic(shards, num_classes=10, num_images=images, size=size, num_val=0,
                    max_count=max(images // 16, 1), num_procs=workers, progress=False)  # fmt: skip
    _extract_folder(shards, work / "folder")
    num_shards = len(list(shards.glob("train-*.tar")))
    overrides = [
        f"data.train={shards}/train-{{000000..{num_shards - 1:06d}}}.tar",
        f"model.img_size={img_size}", "model.num_classes=10", "model.moe.group_size=1",
        f"train.global_batch_size={batch}", f"data.num_workers={workers}", "data.shuffle_buffer=256",
        "data.auto_augment=rand-m9-mstd0.5",
    ]  # fmt: skip
    # RandAugment without inc1: with it, timm can posterize to 0 bits, which Pillow >= 11 rejects; our pipeline
    # redraws the augmentation, torchvision's ImageFolder loader would stop with the ValueError
    cfg = load_config(None, overrides)
    exact = load_config(None, [*overrides, "data.order=exact"])
    rates: dict[str, list[float]] = {"webdataset_stream": [], "webdataset_exact": [], "imagefolder": []}
    cpu_rates: dict[str, list[float]] = {name: [] for name in rates}
    for _ in range(rounds):
        stream, folder = build_train_loader(cfg, 0, 1), _FolderBatches(cfg, work / "folder", batch)
        ordered = build_train_loader(exact, 0, 1)
        for name, batches in (("webdataset_stream", stream), ("imagefolder", folder), ("webdataset_exact", ordered)):
            wall, cpu = _rate(batches, num_batches)
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    best = {name: max(r) for name, r in rates.items()}
    best_cpu = {name: max(r) for name, r in cpu_rates.items()}
    return {
        "images_per_sec": best,
        "images_per_worker_cpu_sec": best_cpu,
        "runs": rates,
        "ratio_stream_vs_imagefolder": best["webdataset_stream"] / best["imagefolder"],
        "ratio_exact_vs_imagefolder": best["webdataset_exact"] / best["imagefolder"],
        "cpu_ratio_stream_vs_imagefolder": best_cpu["webdataset_stream"] / best_cpu["imagefolder"],
        "cpu_ratio_exact_vs_imagefolder": best_cpu["webdataset_exact"] / best_cpu["imagefolder"],
        "settings": {"images": images, "jpeg_px": size, "img_size": img_size, "batch": batch, "workers": workers,
                     "batches_timed": num_batches, "rounds": rounds,
                     "transform": "timm train: RRC + flip + RandAugment m9"},
    }  # fmt: skip


def data_wait(cfg: Config, rank: int, world_size: int, steps: int, warmup: int = 2) -> dict:
    """One rank's training step (forward, backward, AdamW) fed by the loader: time waiting for data / step."""
    import torch.nn.functional as F

    from vimoe_dist.data.loader import build_train_loader
    from vimoe_dist.model import aux_loss, build_model

    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = iter(build_train_loader(cfg, rank, world_size))
    wait = total = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        out = model(batch["image"])
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits, batch.get("target", batch["label"])) + aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= warmup:
            wait += t1 - t0
            total += t2 - t0
    return {
        "data_wait_fraction": wait / total,
        "step_seconds": total / steps,
        "wait_seconds_per_step": wait / steps,
        "steps_timed": steps,
        "batch_per_rank": batch["image"].shape[0],
        "workers": cfg.data.num_workers,
    }


# configs/vimoe_s14_imagenet.yaml on one 8-GPU node, resumed half-way (step 62,500 of 125,000)
IMAGENET = {"samples": 1_281_167, "shards": 1024, "members_per_sample": 2, "global_batch": 1024, "ranks": 8,
            "workers": 10, "step": 62_500}  # fmt: skip


def _first_batch_seconds(cfg: Config, start_step: int) -> float:
    from vimoe_dist.data.loader import build_train_loader

    t0 = time.perf_counter()
    next(iter(build_train_loader(cfg, 0, 1, start_step=start_step)))
    return time.perf_counter() - t0


def resume_cost(shards: Path, images_per_sec: float, rounds: int = 3) -> dict:
    """Measured: tar headers indexed per second (what the exact order reads to find samples, and what a stream
    would read to skip them), the permutation of an ImageNet epoch, and the first batch after a resume at step 0
    and at step 10^6 here. Estimated: both orders' time to reach the position at ImageNet scale (IMAGENET)."""
    from vimoe_dist.data.exact import ExactOrder
    from vimoe_dist.data.tarformat import scan_members

    tars = sorted(str(p) for p in shards.glob("train-*.tar"))
    members, best = 0, float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        members = sum(len(scan_members(t)) for t in tars)
        best = min(best, time.perf_counter() - t0)
    header_rate = members / best
    n = IMAGENET["samples"]
    t0 = time.perf_counter()
    ExactOrder(n, 0).permutation(0)
    permutation_s = time.perf_counter() - t0
    cfg = load_config(None, [f"data.train={shards}/train-{{000000..{len(tars) - 1:06d}}}.tar", "model.img_size=128",
                             "model.num_classes=10", "model.moe.group_size=1", "train.global_batch_size=32",
                             "data.num_workers=0", "data.order=exact"])  # fmt: skip
    first = {str(step): min(_first_batch_seconds(cfg, step) for _ in range(rounds)) for step in (0, 10**6)}
    # ImageNet: a micro-batch of b random samples touches about S (1 - (1 - 1/S)^b) of the S shards, each indexed
    # once per worker; every worker of a rank starts at once
    b = IMAGENET["global_batch"] // IMAGENET["ranks"]
    shards_n, per_shard = IMAGENET["shards"], n / IMAGENET["shards"] * IMAGENET["members_per_sample"]
    touched = shards_n * (1 - (1 - 1 / shards_n) ** b)
    exact_s = permutation_s + touched * per_shard / header_rate + b / images_per_sec
    read = IMAGENET["step"] * IMAGENET["global_batch"]
    per_worker = read / (IMAGENET["ranks"] * IMAGENET["workers"])
    stream_s = per_worker * IMAGENET["members_per_sample"] / header_rate
    return {
        "header_rate_per_sec": header_rate,
        "imagenet_epoch_permutation_sec": permutation_s,
        "first_batch_sec_after_resume_at_step": first,
        "imagenet": {**IMAGENET, "micro_batch": b, "shards_touched_by_a_micro_batch": touched,
                     "exact_resume_sec": exact_s, "exact_full_index_per_worker_sec": n * 2 / header_rate,
                     "stream_skip_samples_per_worker": per_worker, "stream_skip_resume_sec": stream_s},
    }  # fmt: skip


def run_data_bench(out: str | os.PathLike | None = "bench/results/data.json", quick: bool = False) -> dict:
    """Runs both measurements, prints the table, writes the JSON; returns the results."""
    from vimoe_dist.data.digits import write_digits
    from vimoe_dist.data.synthetic import write_synthetic

    torch.manual_seed(0)
    workers = min(2, os.cpu_count() or 1)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "torch": torch.__version__, "cuda": torch.cuda.is_available()}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vimoe-bench-data-") as tmp:
        work = Path(tmp)
        results["throughput"] = throughput(
            work / "tp", images=256 if quick else 1024, size=160, img_size=128, batch=32, workers=workers,
            num_batches=4 if quick else 16,
        )  # fmt: skip
        # the exact order's decode rate per worker: a first batch is decoded by one worker
        per_worker = results["throughput"]["images_per_worker_cpu_sec"]["webdataset_exact"]
        results["resume"] = resume_cost(work / "tp" / "shards", per_worker, rounds=1 if quick else 3)
        write_digits(work / "digits")
        demo = load_config(DEMO_CONFIG if DEMO_CONFIG.exists() else None, [
            f"data.train={work}/digits/train-{{000000..000011}}.tar", "data.val=null", "model.num_classes=10",
        ])  # fmt: skip
        results["data_wait"] = {"demo": data_wait(demo, 0, 2, steps=5 if quick else 20)}
        write_synthetic(work / "vits", num_classes=100, num_images=64 if quick else 256, size=256, num_val=0,
                        max_count=16, num_procs=workers, progress=False)  # fmt: skip
        vits = load_config(None, [
            f"data.train={work}/vits/train-{{000000..{(64 if quick else 256) // 16 - 1:06d}}}.tar",
            "model.backbone=vit_small_patch16_224", "model.img_size=224", "model.num_classes=100",
            "model.moe.layers=last-2", "model.moe.num_experts=8", "model.moe.group_size=8",
            "train.global_batch_size=16", f"data.num_workers={workers}", "data.shuffle_buffer=64",
            "data.auto_augment=rand-m9-mstd0.5", "data.mixup=0.8", "data.cutmix=1.0",
        ])  # fmt: skip
        results["data_wait"]["vit_s"] = data_wait(vits, 0, 1, steps=2 if quick else 4, warmup=1)
    tp, dw = results["throughput"], results["data_wait"]
    first = results["resume"]["first_batch_sec_after_resume_at_step"]
    results["targets"] = {
        "stream_at_least_imagefolder": tp["ratio_stream_vs_imagefolder"] >= 1.0,
        "stream_cost_at_most_imagefolder": tp["cpu_ratio_stream_vs_imagefolder"] >= 1.0,
        "data_wait_under_5pct": all(v["data_wait_fraction"] < 0.05 for v in dw.values()),
        # a resume deep into a run reaches its first batch as fast as a fresh start (within noise: 1.5x)
        "exact_resume_independent_of_step": first["1000000"] < 1.5 * first["0"],
    }
    print_table(results)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return results


def main(argv: list[str] | None = None) -> int:
    """`vimoe bench data [--quick] [--out FILE]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="vimoe bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/data.json", help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke run)")
    args = parser.parse_args(argv)
    run_data_bench(args.out, quick=args.quick)
    return 0


def print_table(results: dict) -> None:
    tp, dw = results["throughput"], results["data_wait"]
    s = tp["settings"]
    print(f"data pipeline throughput ({s['images']} JPEGs {s['jpeg_px']}px -> {s['img_size']}px, batch {s['batch']}, "
          f"{s['workers']} workers, {s['transform']})")  # fmt: skip
    print(f"  {'loader':<20}{'images/s':>10}{'vs ImageFolder':>16}{'img/worker-CPU-s':>18}{'vs ImageFolder':>16}")
    base, base_cpu = tp["images_per_sec"]["imagefolder"], tp["images_per_worker_cpu_sec"]["imagefolder"]
    for name, rate in tp["images_per_sec"].items():
        cpu = tp["images_per_worker_cpu_sec"][name]
        print(f"  {name:<20}{rate:>10.1f}{rate / base:>15.2f}x{cpu:>18.1f}{cpu / base_cpu:>15.2f}x")
    print("data wait per training step (one rank: forward + backward + AdamW on this machine)")
    print(f"  {'setting':<10}{'batch':>7}{'step s':>10}{'wait s':>10}{'wait %':>9}")
    for name, r in dw.items():
        print(f"  {name:<10}{r['batch_per_rank']:>7}{r['step_seconds']:>10.3f}{r['wait_seconds_per_step']:>10.4f}"
              f"{100 * r['data_wait_fraction']:>8.2f}%")  # fmt: skip
    r = results["resume"]
    first, imnet = r["first_batch_sec_after_resume_at_step"], r["imagenet"]
    print(f"resume to the data position (default order exact; tar headers read at {r['header_rate_per_sec']:,.0f}/s)")
    print(f"  here: first batch {first['0']:.3f} s resumed at step 0, {first['1000000']:.3f} s at step 1,000,000")
    print(f"  ImageNet ({imnet['samples']:,} samples, {imnet['shards']} shards, {imnet['ranks']} ranks x "
          f"{imnet['workers']} workers, resumed at step {imnet['step']:,}):")  # fmt: skip
    print(f"    exact (default): {imnet['exact_resume_sec']:.2f} s to the first batch (epoch permutation "
          f"{r['imagenet_epoch_permutation_sec']:.3f} s + indexing ~{imnet['shards_touched_by_a_micro_batch']:.0f} "
          f"shards), the same at any step; each worker indexes all shards once in "
          f"{imnet['exact_full_index_per_worker_sec']:.1f} s, spread over its first batches")  # fmt: skip
    skip = imnet["stream_skip_samples_per_worker"]
    print(f"    stream, if it skipped to its position: {imnet['stream_skip_resume_sec']:.1f} s per worker "
          f"({skip:,.0f} samples' headers each), growing with the step")  # fmt: skip
    t = results["targets"]
    print(f"targets: stream >= ImageFolder: wall {'met' if t['stream_at_least_imagefolder'] else 'MISSED'}, "
          f"per CPU second {'met' if t['stream_cost_at_most_imagefolder'] else 'MISSED'}; "
          f"data wait < 5%: {'met' if t['data_wait_under_5pct'] else 'MISSED'}; exact resume independent of the step: "
          f"{'met' if t['exact_resume_independent_of_step'] else 'MISSED'}")  # fmt: skip
