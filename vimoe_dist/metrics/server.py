"""A minimal HTTP server for one rank's Prometheus endpoint: `GET /metrics` and nothing else.

Why not `prometheus_client.start_http_server`: it answers every path, logs nothing useful, cannot report a port
clash in our words and cannot search for a free port. This server

- binds `metrics.addr` (default 127.0.0.1: the endpoint has no authentication, so opening it to a network is an
  explicit choice, e.g. `metrics.addr=0.0.0.0` on a cluster whose Prometheus scrapes the compute nodes);
- serves the exposition text on `/metrics` (GET and HEAD), 404 on any other path, 501 on other methods, and never
  shows paths, tokens, environment, or the Python version (the `Server` header is just `vimoe`);
- runs in daemon threads, one per connection, each with a socket timeout, so a slow, idle or malformed client is
  dropped without touching the training thread (the stdlib parser answers bad request lines with 400);
- on a taken port raises `UserError` naming it, or with `search=True` walks up to the next free port.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vimoe_dist.errors import UserError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4
MAX_PORT_TRIES = 100
CLIENT_TIMEOUT_S = 5.0  # a connection that sends nothing for this long is closed


class _MetricsHandler(BaseHTTPRequestHandler):
    server_version = "vimoe"
    sys_version = ""
    timeout = CLIENT_TIMEOUT_S
    render: Callable[[], bytes]  # set on the per-server subclass

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        try:
            body = type(self).render()
        except Exception:  # a collector bug must not kill the server thread; say nothing about it to the client
            log.exception("rendering /metrics failed")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape per second is noise in a training log

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the client went away or stalled (timeouts are OSErrors): nothing to say
            super().handle()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # lets a restarted job rebind while old sockets sit in TIME_WAIT; a live listener
    # still makes bind fail on Linux, which is the clash we report

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (socket.getfqdn), which can hang without DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics client %s caused an error", client_address, exc_info=True)


class MetricsServer:
    """A running endpoint; `port` is the one actually bound."""

    def __init__(self, server: _Server, addr: str, port: int) -> None:
        self.addr, self.port = addr, port
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"vimoe-metrics:{port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    render: Callable[[], bytes], addr: str, port: int, search: bool = False, what: str = "metrics.port"
) -> MetricsServer:
    """Binds `addr:port` (or, with `search`, the first free port above it) and serves `render()` on /metrics.

    Args:
        render: returns the exposition text; called once per scrape in the server thread.
        addr: interface to bind (`metrics.addr`).
        port: the port wanted, already including the local rank offset.
        search: walk up to `MAX_PORT_TRIES` ports when `port` is taken, and log the one found.
        what: how the port is named in error messages (e.g. `metrics.port 9400 + local rank 1`).
    """
    handler = type("MetricsHandler", (_MetricsHandler,), {"render": staticmethod(render)})
    tries = MAX_PORT_TRIES if search else 1
    for candidate in range(port, min(port + tries, 65536)):
        try:
            server = _bind(addr, candidate, handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE and search:
                continue
            raise _bind_error(e, addr, candidate, what) from None
        if candidate != port:
            log.warning("%s: %s:%d is in use; serving metrics on port %d instead", what, addr, port, candidate)
        return MetricsServer(server, addr, candidate)
    raise UserError(f"{what}: no free port in {addr}:{port}-{min(port + tries, 65536) - 1} (metrics.port_search)")


def is_loopback(addr: str) -> bool:
    """Whether `addr` (an IP address or `localhost`) only accepts connections from this host."""
    if addr.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _bind(addr: str, port: int, handler: type) -> _Server:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    class Server(_Server):
        address_family = family

    return Server((addr, port), handler)


def _bind_error(e: OSError, addr: str, port: int, what: str) -> UserError:
    if e.errno == errno.EADDRINUSE:
        return UserError(
            f"{what}: port {port} on {addr} is already in use; pick another metrics.port, "
            "set metrics.port_search=true, or metrics.port=0 to turn the endpoint off"
        )
    if e.errno == errno.EACCES:
        return UserError(f"{what}: no permission to bind port {port} on {addr} (ports below 1024 need root)")
    if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
        return UserError(f"metrics.addr: cannot bind {addr!r} on this host ({e.strerror or e})")
    return UserError(f"{what}: cannot bind {addr}:{port} ({e.strerror or e})")
