"""A real Prometheus server (Debian's `prometheus` package) scrapes vimoe ranks; a real Pushgateway receives pushes.

Prometheus runs on loopback with the `vimoe` job of `vimoe_dist/launch/monitoring/prometheus.yml` (scrape interval
cut to 1 s), the targets files the ranks publish (`RUN_DIR/prometheus_targets.json`; for the trainer, which does not
publish yet, the one `python -m vimoe_dist.metrics.targets` writes for one node with two local ranks), and the
rules of `vimoe_dist/launch/monitoring/alerts.yml`. The tests then ask Prometheus's HTTP API what it scraped:
`vimoe_train_images_total` rising for both ranks, `vimoe_moe_tokens_total` for every layer and expert, every
target up, every alert rule healthy, and every query of the Grafana dashboard valid.

- `test_prometheus_scrapes_a_two_rank_training_run`: a real 2-rank `vimoe train` on the digits demo, started
  with torchrun; it also pushes its final values to a real Pushgateway.
- `test_prometheus_scrapes_two_exporters_and_the_dashboard_queries_run`: two ranks' exporters in this process, fed
  by a fake loop: the same checks in seconds, independent of the trainer.
- `test_pushgateway_receives_the_final_values_of_every_rank`.

The packages are installed with apt-get when missing (CI runs as root on a fresh machine). Every process started
here runs in its own session, dies with this test process (PR_SET_PDEATHSIG) and is killed, with everything it
started, by the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vimoe_dist.config import load_config
from vimoe_dist.metrics import build_metrics
from vimoe_dist.metrics.targets import publish_targets

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "vimoe_dist" / "launch" / "monitoring"
PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "prometheus-pushgateway": "prometheus-pushgateway"}


# ------------------------------------------------------------------------------------------ installation


def ensure_installed() -> dict[str, str]:
    """Paths of the binaries, installing the Debian packages when missing (as root, like CI)."""
    missing = sorted({pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None})
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            message = f"needs Debian packages {' '.join(missing)}: apt-get install {' '.join(missing)} (as root)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        for argv in (
            ["apt-get", *lock, "update", "-qq"],
            ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *missing],
        ):
            for _attempt in range(20):  # another apt may hold the lists lock, which the timeout does not cover
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
                if done.returncode == 0 or "lock" not in done.stderr.lower():
                    break
                time.sleep(10)
            if done.returncode:
                pytest.fail(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {binary: shutil.which(binary) for binary in PACKAGES}


@pytest.fixture(scope="module")
def binaries() -> dict[str, str]:
    return ensure_installed()


# --------------------------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGKILL if this test process dies first."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _descendants(root: int) -> list[int]:
    """Every process below `root` (by parent pid, read from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


class Process:
    """A started program whose whole tree `stop()` ends, even the parts that made their own sessions."""

    def __init__(self, argv: list[str], log: Path, **kwargs) -> None:
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent, **kwargs,
        )  # fmt: skip
        self._tree: set[int] = set()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def remember_tree(self) -> None:
        """Notes the current descendants, so they are killed even if their parent dies first."""
        if self.alive():
            self._tree.update(_descendants(self.proc.pid))

    def signal(self, sig: int) -> None:
        self.remember_tree()
        for pid in [self.proc.pid, *self._tree]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def stop(self, grace: float = 30.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.remember_tree()
        for pid in [self.proc.pid, *self._tree]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_file.close()
        return self.proc.returncode

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@pytest.fixture
def processes():
    """Starts programs for a test and ends every one of them (and their children) however the test ends."""
    started: list[Process] = []

    def start(argv: list[str], log: Path, **kwargs) -> Process:
        p = Process(argv, log, **kwargs)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(started):
            p.stop(grace=20)


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count > 65535:
            continue
        ok = True
        for p in range(port, port + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free ports")


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(predicate, timeout: float, what: str, proc: Process | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            value = predicate()
            if value:
                return value
        if proc is not None and not proc.alive():
            pytest.fail(f"{what}: process exited with {proc.proc.returncode}:\n{proc.tail()}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f":\n{proc.tail()}" if proc else ""))


# ------------------------------------------------------------------------------------------- Prometheus


def slurm_targets_file(tmp_path: Path, metrics_port: int, num_ranks: int) -> Path:
    """The targets a one-node Slurm allocation implies (`python -m vimoe_dist.metrics.targets`)."""
    out = tmp_path / "targets" / "4242.json"
    env = {**os.environ, "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_TASKS_PER_NODE": str(num_ranks)}
    env["SLURM_JOB_ID"] = "4242"
    subprocess.run(
        [sys.executable, "-m", "vimoe_dist.metrics.targets", "--port", str(metrics_port), "--out", str(out)],
        env=env, check=True, cwd=REPO,
    )  # fmt: skip
    return out


def start_prometheus(binaries, start, tmp_path: Path, target_files: list[Path]) -> int:
    """Prometheus with the `vimoe` job of vimoe_dist/launch/monitoring/prometheus.yml over the given targets files."""
    example = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = [j for j in example["scrape_configs"] if j["job_name"] == "vimoe"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["file_sd_configs"][0]["files"] = [str(f) for f in target_files]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yml")],
        "scrape_configs": [job],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    check = subprocess.run([binaries["promtool"], "check", "config", str(config_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    port = free_ports()
    proc = start(
        [binaries["prometheus"], f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--storage.tsdb.retention.time=1h"],
        tmp_path / "prometheus.log",
    )  # fmt: skip
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 60, "Prometheus ready", proc)
    return port


def query(prom_port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(url)
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def images_rising(prom_port: int, job: str, ranks: range, min_samples: int = 3) -> bool:
    """True when Prometheus holds, for every rank, at least `min_samples` scrapes of the images counter, never
    decreasing and rising overall."""
    series = {
        r["metric"]["rank"]: r["values"] for r in query(prom_port, f'vimoe_train_images_total{{job="{job}"}}[10m]')
    }
    for rank in ranks:
        values = [float(v) for _, v in series.get(str(rank), [])]
        if len(values) < min_samples or values[-1] <= values[0]:
            return False
        assert all(a <= b for a, b in itertools.pairwise(values)), (rank, values)
    return True


def check_scraped(prom_port: int, job: str, ranks: range, layers: list[str], num_experts: int) -> None:
    assert images_rising(prom_port, job, ranks)
    found: dict[str, set] = {}
    for r in query(prom_port, f'vimoe_moe_tokens_total{{job="{job}"}}'):
        m = r["metric"]
        found.setdefault(m["rank"], set()).add((m["layer"], m["expert"]))
    expected = {(layer, str(e)) for layer in layers for e in range(num_experts)}
    for rank in ranks:
        assert found.get(str(rank)) == expected, (rank, sorted(found.get(str(rank), ())))
    total = query(prom_port, f'sum(vimoe_moe_tokens_total{{job="{job}"}})')
    assert float(total[0]["value"][1]) > 0

    targets = json.loads(http_get(f"http://127.0.0.1:{prom_port}/api/v1/targets")[1])["data"]["activeTargets"]
    assert len(targets) == len(ranks)
    for t in targets:
        assert t["health"] == "up" and not t["lastError"], t
    rules = json.loads(http_get(f"http://127.0.0.1:{prom_port}/api/v1/rules")[1])["data"]["groups"]
    names = [(r["name"], r["health"], r.get("lastError", "")) for g in rules for r in g["rules"]]
    shipped = re.findall(r"^\s*- alert: (\w+)", (MONITORING / "alerts.yml").read_text(), re.M)
    assert [n for n, _, _ in names] == shipped and all(h == "ok" and not e for _, h, e in names), names


def check_dashboard_queries(prom_port: int, job: str) -> None:
    """Every query of the Grafana dashboard, with its variables filled in, is valid PromQL over real data, and the
    central panels are not empty."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = {f"{p['title']} {t['refId']}": t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])}
    exprs.update(
        {
            f"var {v['name']}": v["query"]["query"]
            for v in dashboard["templating"]["list"]
            if isinstance(v.get("query"), dict)
        }
    )
    exprs.update({f"annotation {a['name']}": a["expr"] for a in dashboard["annotations"]["list"]})
    fill = {"$job": job, "$rank": ".*", "$layer": ".*", "$__rate_interval": "5s"}
    empty = []
    for title, expr in exprs.items():
        if title.startswith("var "):
            expr = re.sub(r"label_values\((.*), \w+\)$", r"\1", expr)  # a Grafana function, not PromQL
        for name, value in fill.items():
            expr = expr.replace(name, value)
        if not query(prom_port, expr):
            empty.append(title)
    must_have = {"Throughput (all ranks) A", "Throughput per rank A", "Step time A", "Expert load, block $layer A"}
    must_have |= {"Loss A", "Learning rate A", "Time waiting for data A", "Load imbalance (max / mean) A"}
    assert not must_have & set(empty), empty


# ------------------------------------------------------------------------------------------------- tests


def fake_rank_loop(metrics, stop: threading.Event, layers: list[str], num_experts: int) -> None:
    step = 0
    while not stop.is_set():
        step += 1
        metrics.on_step(step, images=8, step_seconds=0.02, data_wait_seconds=0.002, alltoall_seconds=0.001)
        if step % 5 == 0:
            moe = {layer: {"tokens": [step % 7 + e for e in range(num_experts)], "dropped": 1, "entropy": 1.0}
                   for layer in layers}  # fmt: skip
            metrics.on_log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_sec": 400.0,
                            "grad_norm": 0.5, "bad_samples": 0, "moe": moe})  # fmt: skip
        if step == 50:
            metrics.on_eval({"step": step, "eval_top1": 0.5, "eval_top5": 0.9, "eval_loss": 1.2, "images": 80})
            metrics.on_checkpoint(step, 0.4)
        time.sleep(0.02)


def test_prometheus_scrapes_two_exporters_and_the_dashboard_queries_run(binaries, processes, tmp_path):
    job, layers, num_experts = "vimoe-system", ["4", "5"], 4
    port = free_ports(2)
    cfg = load_config(None, [f"metrics.port={port}", f"metrics.job={job}", "train.progress=false"])
    ranks = [
        build_metrics(cfg, rank=r, local_rank=r, world_size=2, run_dir=tmp_path / f"run{r}", total_steps=10**6)
        for r in range(2)
    ]
    stop = threading.Event()
    loops = [threading.Thread(target=fake_rank_loop, args=(m, stop, layers, num_experts)) for m in ranks]
    try:
        for t in loops:
            t.start()
        # each exporter publishes its endpoint as rank 0 of a job does, into its own RUN_DIR/prometheus_targets.json
        files = [publish_targets(m.prometheus.endpoint(), 0, tmp_path / f"run{r}") for r, m in enumerate(ranks)]
        prom = start_prometheus(binaries, processes, tmp_path, files)
        wait_until(lambda: images_rising(prom, job, range(2), min_samples=4), 60, "4 scrapes of both ranks")
        time.sleep(2)  # let the alert rules evaluate on data
        check_scraped(prom, job, range(2), layers, num_experts)
        check_dashboard_queries(prom, job)
    finally:
        stop.set()
        for t in loops:
            t.join()
        for m in ranks:
            m.close()


def pushed(gateway_port: int, job: str) -> dict[str, float]:
    """rank -> vimoe_train_images_total held by the Pushgateway for `job`."""
    status, body = http_get(f"http://127.0.0.1:{gateway_port}/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "vimoe_train_images_total" and s.labels.get("job") == job:
                out[s.labels["rank"]] = s.value
    return out


def start_pushgateway(binaries, start, tmp_path: Path) -> int:
    port = free_ports()
    proc = start(
        [binaries["prometheus-pushgateway"], f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        tmp_path / "pushgateway.log",
    )
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 60, "Pushgateway ready", proc)
    return port


def test_pushgateway_receives_the_final_values_of_every_rank(binaries, processes, tmp_path):
    gateway = start_pushgateway(binaries, processes, tmp_path)
    job = "vimoe-push"
    cfg = load_config(None, [f"metrics.pushgateway=http://127.0.0.1:{gateway}", f"metrics.job={job}"])
    for rank in range(2):
        m = build_metrics(cfg, rank=rank, local_rank=rank, world_size=2, run_dir=tmp_path, total_steps=10)
        for step in range(1, 11 + rank):
            m.on_step(step, images=4, step_seconds=0.1)
        m.close()  # port 0: nothing served, only pushed
    assert pushed(gateway, job) == {"0": 40.0, "1": 44.0}


def _trainer_missing() -> str | None:
    from vimoe_dist.cli import build_parser

    if not (REPO / "configs" / "digits.yaml").is_file():
        return "configs/digits.yaml does not exist yet"
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "train" not in sub.choices:
        return "`vimoe train` is not registered yet"
    return None


@pytest.mark.slow
@pytest.mark.multiproc
def test_prometheus_scrapes_a_two_rank_training_run(binaries, processes, tmp_path):
    missing = _trainer_missing()
    if missing:
        pytest.skip(missing)
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "vimoe_dist", "data", "digits", "--out", str(data)], check=True, cwd=REPO)
    train_shards = sorted(str(p) for p in data.glob("train-*.tar"))
    val_shards = sorted(str(p) for p in data.glob("val-*.tar"))
    assert train_shards and val_shards

    job, port = "vimoe-digits", free_ports(2)
    gateway = start_pushgateway(binaries, processes, tmp_path)
    prom = start_prometheus(binaries, processes, tmp_path, [slurm_targets_file(tmp_path, port, num_ranks=2)])
    overrides = [
        f"metrics.port={port}", f"metrics.job={job}", f"metrics.pushgateway=http://127.0.0.1:{gateway}",
        f"run.out_dir={tmp_path / 'run'}", f"data.train={json.dumps(train_shards)}",
        f"data.val={json.dumps(val_shards)}", "train.steps=3000", "train.log_every=5", "train.eval_every=0",
        "train.checkpoint_every=0", "train.progress=false",
        # no DataLoader worker processes: torchrun signals each rank's whole process group, and a worker killed
        # by SIGTERM would end the rank before it can checkpoint (the preemption path is what this run ends with)
        "data.num_workers=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    train = processes(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "vimoe_dist", "train", "--config", str(REPO / "configs" / "digits.yaml"), *overrides],
        tmp_path / "train.log", env=env, cwd=REPO,
    )  # fmt: skip

    # both ranks serve, Prometheus sees the images counters rise over several scrapes and every expert's tokens
    def enough() -> bool:
        train.remember_tree()
        return images_rising(prom, job, range(2), min_samples=4) and bool(
            query(prom, f'count by (rank) (vimoe_moe_tokens_total{{job="{job}"}} > 0)')
        )

    wait_until(enough, 600, "Prometheus to scrape both training ranks several times", train, interval=1.0)
    cfg = load_config(REPO / "configs" / "digits.yaml")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    layers = sorted({layer for r in records for layer in r.get("moe", {})}, key=int)
    spec = cfg.model.moe.layers
    assert len(layers) == (int(spec[5:]) if isinstance(spec, str) else len(spec)) > 0
    time.sleep(2)  # the alert rules evaluate on data
    check_scraped(prom, job, range(2), layers, cfg.model.moe.num_experts)
    check_dashboard_queries(prom, job)
    seen = {r["metric"]["rank"]: float(r["value"][1]) for r in query(prom, f'vimoe_train_images_total{{job="{job}"}}')}

    # a preempted job: torchrun passes SIGTERM on to the ranks, which checkpoint, push their final values and exit
    train.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not train.alive(), 300, "the training ranks to exit after SIGTERM", interval=1.0)
    final = pushed(gateway, job)
    assert set(final) == {"0", "1"} and all(final[r] >= seen[r] for r in seen), (final, seen)
