"""Naming the rank that broke a collective (vimoe_dist/parallel/peers.py) against a real TCPStore: the survivors,
checking in from threads as the ranks of a job would, name exactly the rank that never did; a store whose host is
gone gives "unknown" with the reason instead of hanging."""

from __future__ import annotations

import datetime
import socket
import threading
import time

import torch.distributed as dist

from vimoe_dist.parallel.peers import check_in_wait_s, describe_failure, missing_ranks


def _store(port: int, is_master: bool) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, world_size=None, is_master=is_master,
                         timeout=datetime.timedelta(seconds=5), wait_for_workers=False)  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_survivors_name_the_rank_that_never_checks_in():
    port = _port()
    host = _store(port, is_master=True)
    results: dict[int, tuple] = {}

    def survivor(rank: int, delay: float) -> None:
        time.sleep(delay)  # ranks notice a failure at slightly different times
        results[rank] = missing_ranks(rank, 4, wait_s=2.0, store=_store(port, is_master=False))

    threads = [threading.Thread(target=survivor, args=(r, d)) for r, d in ((0, 0.0), (1, 0.5), (3, 1.0))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {r: ([2], "") for r in (0, 1, 3)}
    assert time.monotonic() - t0 < 5
    del host


def test_all_checked_in_returns_early():
    port = _port()
    host = _store(port, is_master=True)
    results = {}

    def survivor(rank: int) -> None:
        results[rank] = missing_ranks(rank, 2, wait_s=30.0, store=_store(port, is_master=False))

    t0 = time.monotonic()
    threads = [threading.Thread(target=survivor, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: ([], ""), 1: ([], "")} and time.monotonic() - t0 < 10
    del host


def test_unreachable_store_is_reported_not_waited_on():
    port = _port()
    host = _store(port, is_master=True)
    client = _store(port, is_master=False)
    del host  # the store's host died
    t0 = time.monotonic()
    missing, note = missing_ranks(1, 2, wait_s=1.0, store=client)
    assert missing is None and "rendezvous store did not answer" in note
    assert time.monotonic() - t0 < 15


def test_description_names_the_rank_or_says_why_not():
    err = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4242\nmore")
    line = describe_failure(0, 1, 60, err)  # one rank: nobody to miss
    assert "\n" not in line and "parallel.timeout_s=60" in line and "Connection closed by peer" in line
    assert check_in_wait_s(600) == 10 and check_in_wait_s(10) == 2
