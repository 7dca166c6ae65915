"""The /metrics endpoint: port clash, port search, port 0, and misbehaving clients (raw sockets on loopback)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from support import raw_request

from vimoe_dist.config import load_config
from vimoe_dist.errors import UserError
from vimoe_dist.metrics import build_metrics
from vimoe_dist.net import free_port_block


@contextlib.contextmanager
def listener(port: int):
    """Another program holding `port` (a real listening socket)."""
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    try:
        yield s
    finally:
        s.close()


def make(tmp_path, port: int, local_rank: int = 0, *extra: str):
    cfg = load_config(None, [f"metrics.port={port}", "train.progress=false", *extra])
    return build_metrics(
        cfg, rank=local_rank, local_rank=local_rank, world_size=2, run_dir=tmp_path / f"r{local_rank}", total_steps=10
    )


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def listening_inodes() -> set[str]:
    """Socket inodes of this process that are listening TCP sockets (from /proc, so nothing is assumed)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(fields[9])
    return mine & listening


def test_port_clash_is_a_clear_error_naming_the_port(tmp_path):
    port = free_port_block(2)
    with listener(port + 1):
        with pytest.raises(UserError, match=rf"port {port + 1} .*already in use.*metrics.port_search"):
            make(tmp_path, port, 1, "metrics.port_search=false")  # local rank 1 wants port + 1
        ok = make(tmp_path, port, 0, "metrics.port_search=false")  # local rank 0's port is free
        assert ok.port == port
        ok.close()


def test_port_clash_message_is_one_line(tmp_path):
    port = free_port_block(1)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"metrics:\n  port: {port}\n  port_search: false\ntrain:\n  progress: false\n")
    with listener(port):
        cfg = load_config(cfg_file)
        with pytest.raises(UserError) as info:
            build_metrics(cfg, rank=0, local_rank=0, world_size=1, run_dir=tmp_path, total_steps=1)
    message = str(info.value)
    assert "\n" not in message and str(port) in message


def test_a_taken_port_is_one_warning_and_the_next_free_port_by_default(tmp_path, caplog):
    port = free_port_block(3)
    with listener(port), caplog.at_level(logging.WARNING):
        metrics = make(tmp_path, port, 0)
        try:
            assert metrics.port == port + 1
            assert get(metrics.port)[0] == 200
        finally:
            metrics.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"port {port + 1} instead" in warnings[0], warnings


def test_port_zero_opens_no_port(tmp_path):
    before = listening_inodes()
    metrics = make(tmp_path, 0)
    metrics.on_step(1, images=1, step_seconds=0.1)
    assert metrics.port is None
    assert listening_inodes() == before
    metrics.close()
    # and the same check does see a port when one is opened
    port = free_port_block(1)
    metrics = make(tmp_path, port)
    assert len(listening_inodes() - before) == 1
    metrics.close()
    assert listening_inodes() == before


def test_serves_only_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("VIMOE_TEST_SECRET", "s3cr3t-t0ken")
    port = free_port_block(1)
    metrics = make(tmp_path, port)
    try:
        status, headers, body = get(port)
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        assert "vimoe_train_steps_total" in text
        assert "s3cr3t-t0ken" not in text and str(tmp_path) not in text and "Python" not in headers.get("Server", "")
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        assert all(name.startswith("vimoe_") for name in names), names
        assert get(port, method="HEAD")[::2] == (200, b"")
        for path in ("/", "/env", "/metrics/../etc/passwd", "/favicon.ico", "/debug/vars"):
            status, _, body = get(port, path)
            assert status == 404 and b"vimoe_" not in body, path
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            assert get(port, method=method)[0] == 501, method
    finally:
        metrics.close()


def test_malformed_requests_do_not_stop_training_or_the_endpoint(tmp_path):
    port = free_port_block(1)
    metrics = make(tmp_path, port)
    step = 0

    def train(n):
        nonlocal step
        for _ in range(n):
            step += 1
            metrics.on_step(step, images=2, step_seconds=0.01)

    try:
        # a client that connects and never speaks holds one thread, not the server
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        bad = [
            b"\x00\xff\x16\x03\x01garbage\r\n\r\n",  # binary junk (a TLS hello, say)
            b"GET\r\n\r\n",  # request line without path and version
            b"GET /metrics HTTP/9.9\r\n\r\n",  # unknown version
            b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",  # request line over the limit
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHo",  # cut off mid-header, then closed
        ]
        for payload in bad:
            reply = raw_request(port, payload, read=not payload.endswith(b"Ho"))
            assert b"vimoe_train" not in reply or payload.startswith(b"GET /metrics HTTP/1.1\r\nHost")
            train(5)
            assert get(port)[0] == 200
        assert raw_request(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
        # several clients at once while training goes on
        results = []
        threads = [threading.Thread(target=lambda: results.append(get(port)[0])) for _ in range(8)]
        for t in threads:
            t.start()
        train(50)
        for t in threads:
            t.join(timeout=30)
        assert results == [200] * 8
        idle.close()
        time.sleep(0.1)
        status, _, body = get(port)
        assert status == 200 and f'vimoe_train_steps_total{{job="vimoe",rank="0"}} {float(step)}' in body.decode()
    finally:
        metrics.close()
    with pytest.raises(OSError):  # closed for real
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
