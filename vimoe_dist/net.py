"""Free TCP ports: the rendezvous port of a launch, and blocks of consecutive ports for per-rank metrics endpoints.

A port found free can be taken by another program before we bind it; callers that cannot tolerate that retry or
search on (the metrics server's `port_search`). Good enough to pick ports on one machine, which is all this is for.
"""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port free on `host` right now (the OS picks it; "" = every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_block(count: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port p such that p .. p + count - 1 are all free on `host` right now (one per local rank's endpoint)."""
    for _ in range(tries):
        base = free_port(host)
        if base + count <= 65536 and all(_is_free(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports on {host or 'any interface'} after {tries} tries")


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
