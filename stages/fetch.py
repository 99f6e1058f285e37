"""Fetching http(s) media for ingest: timeouts, bounded retries, size and redirect limits.

Every URL ends as a ``FetchResult`` or a ``stages.base.Reject`` with a stable reason code
(see docs/reject_reasons_dedup_fetch.md). Only transient failures are retried: timeouts,
connection errors, 5xx and 429. Sizes are checked against ``Content-Length`` first and then
counted while streaming, so an oversized body is never held in memory whole.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from pydantic import BaseModel, ConfigDict, Field
from urllib3.exceptions import ReadTimeoutError

from stages.base import Reject

ALLOWED_SCHEMES = ("http", "https")
# content types the decoder gets to judge; a missing header counts as octet-stream
UNDECIDED_TYPES = ("application/octet-stream", "")
CHUNK = 64 * 1024
FETCH_REASONS = {
    "url_scheme": "the URL (or a redirect target) is not http or https",
    "url_invalid": "an http(s) URL without a host, or one that cannot be parsed",
    "http_status": "the final answer is not 2xx (5xx and 429 after the retries)",
    "http_timeout": "no connection, answer or body within timeout_s, on every attempt",
    "http_connection": "connection refused, reset or dropped, on every attempt",
    "http_too_large": "the body is larger than max_bytes",
    "http_content_type": "the Content-Type is not image/* (audio/*) as expected",
    "http_redirects": "more than max_redirects redirects",
}


class HttpConfig(BaseModel):
    """``source.http``: how ingest (and predict) fetch http(s) media."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_redirects: int = Field(5, ge=0)
    concurrency: int = Field(16, ge=1)
    user_agent: str = "mmpipe/0.1 (+https://github.com/mmpipe)"


@dataclass
class FetchResult:
    data: bytes
    content_type: str
    final_url: str
    attempts: int


class _Transient(Exception):
    """A failure worth retrying; carries the reject to raise once retries run out."""

    def __init__(self, reject: Reject):
        super().__init__(str(reject))
        self.reject = reject


def _is_transient_status(code: int) -> bool:
    return code == 429 or code >= 500


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def check_url(url: str) -> None:
    """Reject anything but an absolute http(s) URL (never file://, ftp://, ...)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise Reject("url_scheme", f"only http and https are fetched, got {parts.scheme or 'no'} scheme: {url}")
    if not parts.netloc:
        raise Reject("url_invalid", f"no host in {url}")


class Fetcher:
    """Thread-safe http(s) fetcher; one ``requests.Session`` per thread (connection pooling)."""

    def __init__(self, http: HttpConfig | None = None):
        self.http = http or HttpConfig()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None   # kept across calls so sessions are reused

    # -- public API -------------------------------------------------------------------------
    def fetch(self, url: str, expect: str) -> FetchResult:
        """GET ``url`` expecting an ``image`` or ``audio`` body; raise ``Reject`` on failure."""
        if expect not in ("image", "audio"):
            raise ValueError(f"expect must be 'image' or 'audio', got {expect!r}")
        check_url(url)
        attempts = 0
        while True:
            attempts += 1
            try:
                data, content_type, final_url = self._attempt(url, expect)
                return FetchResult(data, content_type, final_url, attempts)
            except _Transient as t:
                if attempts > self.http.retries:
                    raise Reject(t.reject.reason, f"{t.reject.detail} (after {attempts} attempts)") from None
                time.sleep(self.http.backoff_s * 2 ** (attempts - 1))

    def fetch_many(self, items: list[tuple[str, str]]) -> list[FetchResult | Reject]:
        """Fetch ``(url, expect)`` pairs on ``http.concurrency`` threads; results in input order."""
        if not items:
            return []

        def one(item: tuple[str, str]) -> FetchResult | Reject:
            try:
                return self.fetch(*item)
            except Reject as r:
                return r

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.http.concurrency, thread_name_prefix="mmpipe-fetch")
            pool = self._pool
        return list(pool.map(one, items))

    def close(self) -> None:
        """Stop the worker threads and close every session (after in-flight fetches end)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)   # outside the lock: workers take it to register sessions
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one attempt ------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.max_redirects = self.http.max_redirects
            session.headers["User-Agent"] = self.http.user_agent
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _attempt(self, url: str, expect: str) -> tuple[bytes, str, str]:
        timeout = (self.http.timeout_s, self.http.timeout_s)
        try:
            with self._session().get(url, timeout=timeout, stream=True, allow_redirects=True) as resp:
                self._check_headers(resp, expect)
                data = self._read_body(resp)
                return data, _media_type(resp.headers.get("Content-Type")), resp.url
        except requests.TooManyRedirects:
            raise Reject("http_redirects", f"more than {self.http.max_redirects} redirects from {url}") from None
        except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema) as exc:
            # e.g. a redirect to ftp:// or file://
            raise Reject("url_scheme", f"{exc}") from None
        except requests.exceptions.InvalidURL as exc:
            raise Reject("url_invalid", f"{exc}") from None
        except requests.Timeout as exc:
            raise _Transient(Reject("http_timeout", f"no answer within {self.http.timeout_s}s: {url}")) from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            # requests reports a read timeout in the middle of the body as a ConnectionError
            if exc.args and isinstance(exc.args[0], ReadTimeoutError):
                raise _Transient(Reject("http_timeout", f"body stalled over {self.http.timeout_s}s: {url}")) from exc
            raise _Transient(Reject("http_connection", f"{type(exc).__name__}: {url}")) from exc

    def _check_headers(self, resp: requests.Response, expect: str) -> None:
        status = f"{resp.status_code} {resp.reason or ''}".strip()
        if _is_transient_status(resp.status_code):
            raise _Transient(Reject("http_status", status))
        if resp.status_code >= 300:
            raise Reject("http_status", status)
        media = _media_type(resp.headers.get("Content-Type"))
        if not (media.startswith(f"{expect}/") or media in UNDECIDED_TYPES):
            raise Reject("http_content_type", f"expected {expect}/*, got {media}")
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.http.max_bytes:
            raise Reject("http_too_large", f"Content-Length {length} > {self.http.max_bytes} bytes")

    def _read_body(self, resp: requests.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in resp.iter_content(CHUNK):
            size += len(chunk)
            if size > self.http.max_bytes:
                raise Reject("http_too_large", f"body over {self.http.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
