"""A loopback HTTP server for tests that fetch "remote" files (img2dataset's tests do the same).

Routes are plain functions ``route(handler) -> None`` registered per path; the server counts hits
per path so tests can assert what was (not) retried. Use the ``http_server`` fixture (import it
into a test module) or the ``loopback_server()`` context manager.

    def test_x(http_server):
        http_server.add("/a.png", body(png_bytes, "image/png"))
        url = http_server.url("/a.png")
"""
from __future__ import annotations

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
def body(data: bytes, content_type: str, content_length: bool = True, status: int = 200) -> Route:
    """Answer ``data``; without ``content_length`` the body ends when the connection closes."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
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
