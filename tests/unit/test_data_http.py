"""http(s) shards against servers that misbehave: a server that accepts and never answers ends the read within
data.http_timeout_s, and a signal that ends the reading process leaves nothing connected to the server."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from vimoe_dist.config import load_config
from vimoe_dist.data import build_val_loader
from vimoe_dist.errors import UserError


@contextlib.contextmanager
def silent_server():
    """Accepts connections and never sends a byte; yields (port, accepted connections)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_silent_server_fails_within_the_time_limit():
    with silent_server() as (port, _):
        cfg = load_config(None, [f"data.val=http://127.0.0.1:{port}/val-000000.tar", "data.http_timeout_s=2",
                                 "model.num_classes=10", "model.moe.group_size=1", "train.global_batch_size=4",
                                 "data.num_workers=0"])  # fmt: skip
        t0 = time.monotonic()
        with pytest.raises(UserError) as info:
            build_val_loader(cfg, 0, 1)  # counts the val samples by reading the shard: the read must end
        assert time.monotonic() - t0 < 15
    message = str(info.value)
    assert "\n" not in message and f"127.0.0.1:{port}/val-000000.tar" in message and "timed out" in message


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_read_and_closes_the_connection(tmp_path, sig):
    """`vimoe data manifest URL` blocked on a silent server: the signal ends it, and no helper process (curl, in
    webdataset's opener) stays connected to the server afterwards."""
    with silent_server() as (port, accepted):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vimoe_dist", "data", "manifest", f"http://127.0.0.1:{port}/x.tar",
             "--out", str(tmp_path / "m.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not accepted and time.monotonic() < deadline:
                time.sleep(0.1)
            assert accepted, "the reader never connected"
            proc.send_signal(sig)
            proc.communicate(timeout=30)
            conn = accepted[0]
            conn.settimeout(10)
            while conn.recv(
                4096
            ):  # the request, then b"" once the peer closed (socket.timeout while something holds it)
                pass
        finally:
            proc.kill()
            proc.communicate()
    assert not (tmp_path / "m.json").exists()
