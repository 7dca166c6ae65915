"""Ctrl-C and SIGTERM through `vimoe launch`: each rank gets exactly one stop signal, `vimoe launch` ends with one
line and 128+N (no traceback from it or from the launcher), and a launcher that does not stop is killed after the
grace or at a second signal.

The real deepspeed runner, `deepspeed.launcher.launch` and torchrun run here; the ranks are a stand-in `vimoe_dist`
package put first on the ranks' PYTHONPATH (its `__main__` records the signals it gets and exits like a rank that
checkpointed), so no training is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import data_yaml

REPO = Path(__file__).resolve().parents[2]

FAKE_RANK = """
import os, signal, sys, time
out, rank = os.environ["FAKE_RANK_DIR"], os.environ.get("RANK", "?")
got = []
def on_signal(signum, frame):
    got.append(signum)
    with open(f"{out}/rank{rank}.signals", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
with open(f"{out}/rank{rank}.up", "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 120
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.5)  # "saving a checkpoint": a second signal now would be recorded as well
sys.exit(75 if got else 1)
"""


@pytest.fixture
def fake_ranks(tmp_path):
    """A `vimoe_dist` package whose `__main__` is the stand-in rank and whose other modules are the real ones."""
    package = tmp_path / "fake" / "vimoe_dist"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__path__.append({str(REPO / 'vimoe_dist')!r})\n")
    (package / "__main__.py").write_text(FAKE_RANK)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n{data_yaml(tmp_path / 'data')}")
    return package.parent, config


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(("launcher", "sig"), [("deepspeed", signal.SIGINT), ("torchrun", signal.SIGTERM)])
def test_a_stop_signal_reaches_every_rank_once_and_launch_ends_with_one_line(fake_ranks, tmp_path, launcher, sig):
    fake, config = fake_ranks
    ranks_dir = tmp_path / "ranks"
    ranks_dir.mkdir()
    python = f"env PYTHONPATH={fake}:{REPO} {sys.executable}"
    argv = [sys.executable, "-m", "vimoe_dist", "launch", "local", "--nproc", "2", "--launcher", launcher,
            "--python", python, "--config", str(config)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_RANK_DIR": str(ranks_dir)}
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        # cwd: `python -m vimoe_dist` looks in the current directory first, where a checkout has the real one
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        ranks_up = lambda: len(list(ranks_dir.glob("*.up"))) == 2 or proc.poll() is not None  # noqa: E731
        wait_for(ranks_up, 300, "two ranks up")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(sig)  # Ctrl-C reaches only `vimoe launch`'s process group; `kill` only its pid
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in out + err, err
    assert err.strip().splitlines()[-1].startswith(f"vimoe launch: stopped by {signal.Signals(sig).name}: "), err
    assert err.count("vimoe launch:") == 1, err
    # exactly one stop signal each: a second would cut a checkpoint short
    signals = [p.read_text().split() for p in sorted(ranks_dir.glob("*.signals"))]
    assert len(signals) == 2 and all(len(s) == 1 for s in signals), signals
    for pid_file in ranks_dir.glob("*.up"):  # and no rank is left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


DRIVER = """
import sys
from vimoe_dist.launch.supervise import run_supervised
sys.exit(run_supervised(["bash", "-c", "trap '' INT TERM; echo up; sleep 60"], name="stubborn", grace_s={grace}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("signals", "grace", "bound"), [((signal.SIGTERM,), 2.0, 20), ((2, 2), 300.0, 20)])
def test_a_launcher_that_does_not_stop_is_killed_after_the_grace_or_a_second_signal(signals, grace, bound):
    code = textwrap.dedent(DRIVER.format(grace=grace))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"up\n"
        started = time.monotonic()
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=bound)
    finally:
        proc.kill()
    first = signal.Signals(signals[0])
    assert proc.returncode == 128 + first and time.monotonic() - started < bound
    assert err.decode().splitlines() == [
        f"vimoe launch: stopped by {first.name}: told stubborn to stop, and it was killed by SIGKILL (status -9)"
    ]


def test_without_a_signal_the_exit_status_is_the_launchers():
    from vimoe_dist.launch.supervise import run_supervised

    assert run_supervised(["bash", "-c", "exit 3"], name="x") == 3
    assert run_supervised(["bash", "-c", "kill -TERM $$"], name="x") == 143
