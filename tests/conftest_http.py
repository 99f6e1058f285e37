"""A loopback HTTP server for tests that fetch "remote" files (img2dataset's tests do the same).

Routes are plain functions ``route(handler) -> None`` registered per path; the server counts hits
per path so tests can assert what was (not) retried. Use the ``http_server`` fixture (import it
into a test module) or the ``loopback_server()`` context manager.

    def test_x(http_server):
        http_server.add("/a.png", body(png_bytes, "image/png"))
        url = http_server.url("/a.png")
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.hits[path] += 1
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404)
            return
        route(self)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        # clients that time out hang up on slow routes: a broken pipe here is expected
        pass


class LoopbackServer:
    """Handle on a running server: register routes, build URLs, read hit counts."""

    def __init__(self, server: _Server):
        self._server = server
        host, port = server.server_address[:2]
        self.base_url = f"http://{host}:{port}"

    def add(self, path: str, route: Route) -> str:
        self._server.routes[path] = route
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + path

    def hits(self, path: str) -> int:
        with self._server.lock:
            return self._server.hits[path]


@contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LoopbackServer(server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    with loopback_server() as server:
        yield server


# -- route builders -------------------------------------------------------------------------
def body(data: bytes, content_type: str, content_length: bool = True, status: int = 200,
         headers: list[tuple[str, str]] = ()) -> Route:
    """Answer ``data``; without ``content_length`` the body ends when the connection closes."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        for name, value in headers:
            h.send_header(name, value)
        if content_length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def status(code: int) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_error(code)

    return route


def redirect(location: str, code: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def slow(seconds: float, then: Route) -> Route:
    """Sleep before answering (a server that does not answer within the client's timeout)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        then(h)

    return route


def stalled_body(head: bytes, seconds: float, content_type: str) -> Route:
    """Send headers and part of the body, then stall (a read timeout mid-body)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(head) * 2))
        h.end_headers()
        h.wfile.write(head)
        h.wfile.flush()
        time.sleep(seconds)

    return route


def fail_first(times: int, failure: Route, then: Route) -> Route:
    """Answer ``failure`` for the first ``times`` requests, then ``then`` (a transient fault)."""
    lock = threading.Lock()
    seen = [0]

    def route(h: BaseHTTPRequestHandler) -> None:
        with lock:
            seen[0] += 1
            n = seen[0]
        (failure if n <= times else then)(h)

    return route


# -- the network guard ----------------------------------------------------------------------
class NetworkGuard:
    """Nothing a test runs may reach beyond loopback. ``socket.getaddrinfo`` answers numeric
    hosts, ``localhost`` and the names in ``names`` (a fake DNS: name -> address, or a list of
    successive answers) and refuses any
    other name without a query; ``socket.socket.connect`` refuses every non-loopback address. Each
    refusal is recorded in ``attempts`` and raises ``OSError``; the fixture fails the test at its end
    if anything was attempted that the test did not take out of ``attempts`` (a broken check then
    shows up as a failed test, never as traffic)."""

    def __init__(self) -> None:
        self.names: dict[str, str | list[str]] = {}
        self.attempts: list[str] = []
        self.lookups: list[str] = []

    def getaddrinfo(self, real):
        def lookup(host, port, family=0, type=0, proto=0, flags=0):
            name = host.decode() if isinstance(host, bytes) else str(host)
            self.lookups.append(name)
            if name.lower() in self.names:
                answer = self.names[name.lower()]
                if isinstance(answer, list):   # successive answers (DNS rebinding); the last one stays
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                return real(answer, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            if name.lower() == "localhost":
                return real("127.0.0.1", port, family, type, proto, flags | socket.AI_NUMERICHOST)
            try:
                return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except socket.gaierror:
                self.attempts.append(f"DNS lookup of {name}")
                raise socket.gaierror(socket.EAI_NONAME, f"network guard: no DNS in tests ({name})") from None
        return lookup

    def connect(self, real):
        guard = self

        def connect(sock, address):
            host = address[0] if isinstance(address, tuple) else address
            if isinstance(host, str) and sock.family in (socket.AF_INET, socket.AF_INET6):
                import ipaddress

                if not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
                    guard.attempts.append(f"connect to {host}")
                    raise OSError(f"network guard: connection to {host} refused in tests")
            return real(sock, address)
        return connect


@pytest.fixture
def network_guard(monkeypatch) -> Iterator[NetworkGuard]:
    guard = NetworkGuard()
    monkeypatch.setattr(socket, "getaddrinfo", guard.getaddrinfo(socket.getaddrinfo))
    monkeypatch.setattr(socket.socket, "connect", guard.connect(socket.socket.connect))
    yield guard
    assert not guard.attempts, f"tried to reach beyond loopback: {guard.attempts}"
