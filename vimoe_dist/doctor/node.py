"""Checks of the node itself: InfiniBand, /dev/shm, the open-files limit, free disk for the run, metrics ports.

Paths are arguments (defaulting to the real ones) so that a test can point a check at a tiny tmpfs of its own; the
thresholds are module constants and say why they are what they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import shutil
import tempfile
from pathlib import Path

from vimoe_dist.doctor.result import FAIL, OK, SKIP, WARN, Check

MIB, GIB = 2**20, 2**30
DOCKER_DEFAULT_SHM = 64 * MIB
# without a config: DeepSpeed's own report warns under 512 MiB; an ImageNet batch of 128 float images is 77 MB
SHM_FAIL, SHM_WARN = 512 * MIB, 2 * GIB
# torch's DataLoader passes every batch from its workers as file descriptors (the default sharing strategy), and
# NCCL opens its own: with many workers and prefetching the common soft limit of 1024 runs out ("Too many open
# files", "received 0 items of ancdata"); below 1024 a run is unlikely to get far
NOFILE_FAIL, NOFILE_WANT = 1024, 4096
# without a config: room for a few checkpoints of a ViT-S/B ViMoE (about 1-4 GB each)
DISK_FAIL, DISK_WARN = 1 * GIB, 20 * GIB
# DeepSpeed checkpoint bytes per parameter, bf16 with fp32 optimizer: 2 (weights) + 4 (master) + 8 (Adam moments),
# rounded up for the per-expert files and ZeRO's bookkeeping
CHECKPOINT_BYTES_PER_PARAM = 16


def check_infiniband(sys_root: str = "/sys/class/infiniband", dev_root: str = "/dev/infiniband") -> Check:
    """RDMA devices (InfiniBand or RoCE) with an active port, usable from this process: the device files exist (a
    container needs `--device /dev/infiniband`) and libibverbs loads (NCCL's IB transport needs it)."""
    root = Path(sys_root)
    devices = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if not devices:
        return Check(
            "infiniband", WARN, "no InfiniBand/RoCE device: NCCL between nodes would use TCP sockets",
            fix="nothing to do for one node; for several, give the job the HCAs (--device /dev/infiniband)",
        )  # fmt: skip
    ports = []
    for dev in devices:
        for port in sorted((root / dev / "ports").glob("*")):
            state = _read(port / "state")  # e.g. "4: ACTIVE"
            ports.append(
                {
                    "device": dev,
                    "port": port.name,
                    "state": state.split(":")[-1].strip(),
                    "rate": _read(port / "rate"),
                    "link_layer": _read(port / "link_layer"),
                }
            )
    data = {"ports": ports}
    active = [p for p in ports if p["state"] == "ACTIVE"]
    described = ", ".join(f"{p['device']}:{p['port']} {p['rate']} ({p['link_layer']})" for p in active[:4])
    if not active:
        return Check(
            "infiniband", WARN, f"{len(devices)} RDMA device(s), no port ACTIVE",
            fix="check the cabling and the subnet manager (ibstat)", data=data,
        )  # fmt: skip
    if not list(Path(dev_root).glob("uverbs*")):
        return Check(
            "infiniband", FAIL, f"{described} on the host, but no {dev_root}/uverbs* here",
            fix="run the container with --device /dev/infiniband (and --cap-add IPC_LOCK)", data=data,
        )  # fmt: skip
    if not _libibverbs_loads():
        return Check(
            "infiniband", FAIL, f"{described}, but libibverbs does not load: NCCL cannot use InfiniBand",
            fix="install rdma-core, libibverbs1 and ibverbs-providers (in the image)", data=data,
        )  # fmt: skip
    if os.environ.get("NCCL_IB_DISABLE", "0") not in ("", "0"):
        return Check(
            "infiniband", WARN, f"{described}, but NCCL_IB_DISABLE={os.environ['NCCL_IB_DISABLE']}",
            fix="unset NCCL_IB_DISABLE unless you mean NCCL to avoid InfiniBand", data=data,
        )  # fmt: skip
    return Check("infiniband", OK, described, data=data)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "?"


def _libibverbs_loads() -> bool:
    for name in ("libibverbs.so.1", ctypes.util.find_library("ibverbs")):
        if name:
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                continue
    return False


def shm_need(image_bytes: int, micro_batch: int, num_workers: int, prefetch: int, local_ranks: int) -> tuple[int, int]:
    """(minimum, comfortable) bytes of /dev/shm for the data loaders of a node: every worker of every local rank
    holds at least one batch there, and up to `prefetch` batches when it runs ahead."""
    batch = image_bytes * micro_batch
    workers = max(num_workers, 1) * local_ranks
    return workers * batch, workers * max(prefetch, 1) * batch


def check_shm(path: str = "/dev/shm", need: tuple[int, int] | None = None) -> Check:
    """Room in /dev/shm: DataLoader workers hand batches over through it (and NCCL uses it within a node), so
    Docker's 64 MB default kills the workers ("bus error")."""
    try:
        st = os.statvfs(path)
    except OSError as e:
        return Check("shm", FAIL, f"{path}: {e.strerror or e}", fix="mount a tmpfs on /dev/shm")
    size, free = st.f_frsize * st.f_blocks, st.f_frsize * st.f_bavail
    data = {"path": path, "size_bytes": size, "free_bytes": free}
    summary = f"{path}: {_gib(free)} free of {_gib(size)}"
    fix = "give the container more: docker run --shm-size=16g (or --ipc=host)"
    if size <= DOCKER_DEFAULT_SHM:
        return Check("shm", FAIL, f"{summary}: Docker's 64 MB default", fix=fix, data=data)
    if need is None:
        if free < SHM_FAIL:
            return Check("shm", FAIL, f"{summary}, under 512 MiB", fix=fix, data=data)
        if free < SHM_WARN:
            return Check("shm", WARN, f"{summary}: tight for ImageNet-sized batches", fix=fix, data=data)
        return Check("shm", OK, summary, data=data)
    least, comfortable = need
    data.update(need_bytes=least, comfortable_bytes=comfortable)
    if free < least:
        return Check(
            "shm", FAIL, f"{summary}; the run's loaders need at least {_gib(least)} (one batch per worker)",
            fix=f"{fix}, or fewer data.num_workers", data=data,
        )  # fmt: skip
    if free < comfortable:
        return Check(
            "shm", WARN, f"{summary}; up to {_gib(comfortable)} with data.prefetch batches per worker",
            fix=f"{fix}, or a smaller data.prefetch", data=data,
        )  # fmt: skip
    return Check("shm", OK, f"{summary} (the run needs up to {_gib(comfortable)})", data=data)


def check_open_files() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    data = {"soft": soft, "hard": hard}
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= NOFILE_WANT:
        return Check("open_files", OK, f"open-files limit {soft} (hard {hard})", data=data)
    if hard != unlimited and hard < NOFILE_WANT:
        fix = f"the hard limit is {hard}: raise it (docker --ulimit nofile=65536:65536, /etc/security/limits.conf)"
    else:
        fix = "ulimit -n 65536 before starting the job"
    status = FAIL if soft < NOFILE_FAIL else WARN
    return Check("open_files", status, f"open-files limit {soft} (hard {hard}): DataLoader workers need more", fix=fix,
                 data=data)  # fmt: skip


def check_disk(out_dir: str, checkpoint_bytes: int | None = None, keep: int = 2) -> Check:
    """Free space where the run writes (`run.out_dir`, or its nearest existing parent) and that it is writable.

    With a checkpoint size: a fail below one checkpoint (+ 1 GiB for logs), a warning below `keep + 1` (a new
    checkpoint is complete before the oldest is pruned)."""
    target = Path(out_dir).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        return Check("disk", FAIL, f"run.out_dir: {str(existing)!r} is a file", fix="choose another run.out_dir")
    free = shutil.disk_usage(existing).free
    data = {"out_dir": str(target), "checked": str(existing), "free_bytes": free}
    where = f"{_gib(free)} free in {existing}"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vimoe-doctor-"):
            pass
    except OSError as e:
        return Check("disk", FAIL, f"{where}, not writable ({e.strerror or e})", fix="choose a writable run.out_dir",
                     data=data)  # fmt: skip
    fix = "free space or point run.out_dir at a larger file system"
    if checkpoint_bytes is None:
        least, comfortable = DISK_FAIL, DISK_WARN
        need = ""
    else:
        least, comfortable = checkpoint_bytes + GIB, (keep + 1) * checkpoint_bytes + GIB
        need = f"; a checkpoint takes about {_gib(checkpoint_bytes)}, train.keep_checkpoints={keep}"
        data.update(checkpoint_bytes=checkpoint_bytes, need_bytes=comfortable)
    if free < least:
        return Check("disk", FAIL, f"{where}{need}", fix=fix, data=data)
    if free < comfortable:
        return Check("disk", WARN, f"{where}{need}", fix=fix, data=data)
    return Check("disk", OK, f"{where}{need}", data=data)


def check_metrics_ports(port: int, addr: str, local_ranks: int, search: bool = False) -> Check:
    """Binds the endpoint of every local rank (port + local rank on `metrics.addr`) with the metrics server's own
    code, and closes it again: what fails here fails the same way when the run starts."""
    if port == 0:
        return Check("metrics_ports", SKIP, "metrics.port is 0: no Prometheus endpoint")
    from vimoe_dist.errors import UserError
    from vimoe_dist.metrics.server import start_metrics_server

    last = port + local_ranks - 1
    span = f"{addr}:{port}" + (f"-{last}" if last != port else "")
    data = {"addr": addr, "ports": list(range(port, last + 1))}
    for rank in range(local_ranks):
        try:
            what = f"metrics.port {port} + local rank {rank}"
            start_metrics_server(lambda: b"", addr, port + rank, what=what).close()
        except UserError as e:
            status = WARN if search else FAIL
            hint = "metrics.port_search is on: the rank will use the next free port" if search else "see the message"
            return Check("metrics_ports", status, str(e), fix=hint, data=data)
    return Check("metrics_ports", OK, f"{span} free for {local_ranks} local rank(s)", data=data)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.2f} MiB"
