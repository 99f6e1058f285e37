"""Fetching http(s) media for ingest: address safety, timeouts, bounded retries, size and
redirect limits.

Every URL ends as a ``FetchResult`` or a ``stages.base.Reject`` with a stable reason code
(see docs/reject_reasons_dedup_fetch.md). Only transient failures are retried: timeouts,
connection errors, 5xx and 429. Sizes are checked against ``Content-Length`` first and then
counted while streaming, so an oversized body is never held in memory whole.

Server-side request forgery: a manifest must not make mmpipe read its own cluster's services. The
host of every URL, and of every redirect target, is resolved here and each address it resolves
to is checked (loopback, private, link-local, shared, multicast, reserved and unspecified
addresses are refused, IPv4 embedded in IPv6 included, whatever spelling the URL used); the
connection then goes to the address that was checked (urllib3 pools on that IP, with the host
name kept for the Host header, SNI and certificate checks), so a second DNS answer cannot swap
it. ``source.http.allow_private_networks`` and ``allow_hosts`` lift this for local testing and
private object stores. requests is not used: it resolves names itself, after any check.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stages.base import Reject, redact_urls
from stages.modalities import MEDIA

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
    "http_content_type": "the Content-Type is not the modality's (image/*, audio/*, video/*) as expected",
    "http_redirects": "more than max_redirects redirects",
    "url_blocked": "the host (or a redirect's) resolves to a loopback, private, link-local, shared, multicast, "
                   "reserved or unspecified address, not allowed by allow_private_networks / allow_hosts",
    "http_opt_out": "the answer's X-Robots-Tag opts out of AI use (a directive in opt_out_directives: noai, "
                    "noimageai, noindex, noimageindex), or, with robots_txt on, the site's robots.txt disallows the URL",
}
ROBOTS_MAX_BYTES = 512 * 1024   # RFC 9309: parse at least the first 500 KiB
ROBOTS_HOSTS = 4096             # robots.txt answers kept per fetching process (least recently used go)
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
T = TypeVar("T")


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
    # X-Robots-Tag directives that opt a file out (img2dataset's set); [] fetches whatever the header says
    opt_out_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    max_retry_after_s: float = Field(60.0, ge=0)   # a 429 / 503 asking for a longer wait is not retried
    per_host_concurrency: int = Field(4, ge=1)      # requests to one host at a time (per fetching process)
    per_host_rate: float = Field(0.0, ge=0)         # requests per second to one host at most; 0: no limit
    allow_private_networks: bool = False   # True: any address may be fetched (local testing)
    allow_hosts: list[str] = Field(default_factory=list)   # host names or CIDRs fetched wherever they resolve
    robots_txt: bool = False   # True: honour each site's robots.txt for user_agent's product token (RFC 9309)

    @field_validator("allow_hosts")
    @classmethod
    def _hosts_or_networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if "/" in host:
                try:
                    ipaddress.ip_network(host, strict=False)
                except ValueError as exc:
                    raise ValueError(f"allow_hosts: {host!r} is not a CIDR ({exc})") from None
        return [h.lower().strip("[]") for h in hosts]


@dataclass
class FetchResult:
    data: bytes
    content_type: str
    final_url: str
    attempts: int


class _Transient(Exception):
    """A failure worth retrying; carries the reject to raise once retries run out, and the wait
    the server asked for (Retry-After), if it did."""

    def __init__(self, reject: Reject, wait: float | None = None):
        super().__init__(str(reject))
        self.reject = reject
        self.wait = wait


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


def opted_out(values: list[str], directives: list[str], user_agent: str) -> str | None:
    """The X-Robots-Tag directive that opts this file out, if any (img2dataset's reading): each
    header value is ``[crawler:] directive, directive...``; a value naming a crawler counts only
    for ``*`` or this crawler's product token."""
    wanted = {d.lower() for d in directives}
    agent = user_agent.split("/", 1)[0].strip().lower()
    for value in values if wanted else ():
        head, sep, tail = value.partition(":")
        if sep and head.strip().lower() not in ("*", agent):
            continue
        for directive in (tail if sep else value).split(","):
            if directive.strip().lower() in wanted:
                return directive.strip().lower()
    return None


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


def _embedded(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The IPv4 addresses an IPv6 one carries (mapped, 6to4, Teredo, NAT64), then the address itself."""
    out = []
    if isinstance(addr, ipaddress.IPv6Address):
        out += [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
        out += list(addr.teredo or ())
        if addr in _NAT64:
            out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out + [addr]


def address_problem(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be fetched from, or None for a public unicast address."""
    for a in _embedded(addr):
        for kind in ("loopback", "unspecified", "link_local", "multicast", "reserved", "private"):
            if getattr(a, f"is_{kind}"):
                return kind.replace("_", "-")
        if not a.is_global:
            return "not globally routable"
    return None


@dataclass(frozen=True)
class Target:
    """One hop of a fetch: where to connect (the checked address) and what to ask for."""

    scheme: str
    host: str        # the URL's host name, for the Host header, SNI and the certificate
    ip: str          # the address that was checked, the only one connected to
    port: int
    path: str        # path and query
    host_header: str


class UrlPolicy:
    """Resolves a URL's host and refuses addresses inside the cluster (see the module docstring)."""

    def __init__(self, http: HttpConfig):
        self.allow_all = http.allow_private_networks
        self.hosts = {h for h in http.allow_hosts if "/" not in h}
        self.networks = [ipaddress.ip_network(h, strict=False) for h in http.allow_hosts if "/" in h]

    def target(self, url: str) -> Target:
        check_url(url)
        parts = urlsplit(url)
        try:
            host, port = (parts.hostname or "").lower(), parts.port
        except ValueError as exc:   # a port that is not a number, or out of range
            raise Reject("url_invalid", f"{exc}: {url}") from None
        if not host:
            raise Reject("url_invalid", f"no host in {url}")
        scheme = parts.scheme.lower()
        port = port or (443 if scheme == "https" else 80)
        ip = self.resolve(host, port, url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(scheme, host, ip, port, path, parts.netloc.rsplit("@", 1)[-1])

    def resolve(self, host: str, port: int, url: str) -> str:
        """The first address ``host`` resolves to, once every address it resolves to passed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _Transient(Reject("http_connection", f"cannot resolve {host}: {exc}")) from None
        addrs = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addrs:
            raise _Transient(Reject("http_connection", f"{host} resolves to no address"))
        if not (self.allow_all or host in self.hosts):
            for addr in addrs:
                problem = address_problem(addr)
                if problem and not any(addr in net for net in self.networks):
                    raise Reject("url_blocked", f"{host} resolves to {addr} ({problem}): {url}")
        return str(addrs[0])


class Fetcher:
    """Thread-safe http(s) fetcher; each thread keeps its urllib3 connection pools (one per
    checked address), so connections are reused."""

    def __init__(self, http: HttpConfig | None = None):
        self.http = http or HttpConfig()
        self.policy = UrlPolicy(self.http)
        self._local = threading.local()
        self._sessions: list[dict] = []   # each thread's pools, to close them all
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None   # kept across calls so connections are reused
        self._hosts: dict[str, tuple[threading.Semaphore, list[float]]] = {}   # host -> (slots, [next start])
        self._robots: OrderedDict[str, RobotFileParser] = OrderedDict()   # origin -> its rules
        self._robots_locks: dict[str, threading.Lock] = {}   # one robots.txt request per origin at a time

    # -- public API -------------------------------------------------------------------------
    def fetch(self, url: str, expect: str) -> FetchResult:
        """GET ``url`` expecting a body of media modality ``expect`` (``image``, ``audio``, ``video``:
        its Content-Type's type); raise ``Reject`` on failure. A reject's detail never shows
        credentials written into a URL (``user:password@``)."""
        if expect not in MEDIA:
            raise ValueError(f"expect must be one of {', '.join(MEDIA)}, got {expect!r}")
        try:
            return self._fetch(url, expect)
        except Reject as r:
            raise Reject(r.reason, redact_urls(r.detail)) from None

    def _fetch(self, url: str, expect: str) -> FetchResult:
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
                if t.wait is not None and t.wait > self.http.max_retry_after_s:
                    raise Reject(t.reject.reason, f"{t.reject.detail} (Retry-After {t.wait:.0f} s is over "
                                                  f"max_retry_after_s {self.http.max_retry_after_s:g})") from None
                time.sleep(max(self.http.backoff_s * 2 ** (attempts - 1), t.wait or 0.0))

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
        for pools in sessions:
            for pool in pools.values():
                pool.close()
        self._local = threading.local()

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one attempt ------------------------------------------------------------------------
    def _connection(self, target: Target):
        """This thread's pool for ``target``'s checked address (made on first use)."""
        import urllib3

        pools = getattr(self._local, "pools", None)
        if pools is None:
            pools = self._local.pools = {}
            with self._lock:
                self._sessions.append(pools)
        key = (target.scheme, target.ip, target.port, target.host)
        if key not in pools:
            common = {"maxsize": 1, "retries": False, "block": False}
            if target.scheme == "https":
                import certifi

                pools[key] = urllib3.HTTPSConnectionPool(
                    target.ip, target.port, server_hostname=target.host, assert_hostname=target.host,
                    cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **common)
            else:
                pools[key] = urllib3.HTTPConnectionPool(target.ip, target.port, **common)
        return pools[key]

    @contextmanager
    def _polite(self, host: str) -> Iterator[None]:
        """At most ``per_host_concurrency`` requests to ``host`` at once, started at most
        ``per_host_rate`` a second (a crawl must not hammer one server with its whole concurrency)."""
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = (threading.Semaphore(self.http.per_host_concurrency), [0.0])
            slots, next_start = self._hosts[host]
        with slots:
            if self.http.per_host_rate > 0:
                with self._lock:
                    now = time.monotonic()
                    start = max(now, next_start[0])
                    next_start[0] = start + 1.0 / self.http.per_host_rate
                time.sleep(max(0.0, start - now))
            yield

    def _attempt(self, url: str, expect: str) -> tuple[bytes, str, str]:
        """One GET of a media file; its headers checked, then its body read within max_bytes."""
        def answer(resp, final_url: str) -> tuple[bytes, str, str]:
            self._check_headers(resp, expect)
            return self._read_body(resp), _media_type(resp.headers.get("Content-Type")), final_url

        return self._follow(url, answer, robots=self.http.robots_txt)

    def _follow(self, url: str, answer: Callable[[Any, str], T], robots: bool) -> T:
        """GET ``url``, following redirects by hand: every hop's host is resolved and checked (and,
        with ``robots``, its site's robots.txt consulted); ``answer(response, url)`` reads the last."""
        import urllib3

        from urllib3.exceptions import (HTTPError, LocationParseError, NewConnectionError, ProtocolError,
                                        ReadTimeoutError, SSLError, TimeoutError as Urllib3Timeout)

        timeout = urllib3.Timeout(connect=self.http.timeout_s, read=self.http.timeout_s)
        current = url
        for _ in range(self.http.max_redirects + 1):
            target = self.policy.target(current)
            if robots:
                self._check_robots(current, target)
            headers = {"Host": target.host_header, "User-Agent": self.http.user_agent, "Accept-Encoding": "gzip, deflate"}
            try:
                with self._polite(target.host):
                    resp = self._connection(target).urlopen("GET", target.path, headers=headers, redirect=False,
                                                            retries=False, timeout=timeout, preload_content=False,
                                                            assert_same_host=False)
                    try:
                        if resp.status in REDIRECTS and resp.headers.get("Location"):
                            current = urljoin(current, resp.headers["Location"])
                            check_url(current)
                            continue
                        return answer(resp, current)
                    finally:
                        resp.release_conn()
            except LocationParseError as exc:
                raise Reject("url_invalid", f"{exc}") from None
            except NewConnectionError as exc:   # before the timeouts: urllib3 2 derives it from ConnectTimeoutError
                if _timed_out(exc.__context__):
                    raise _Transient(Reject("http_timeout", f"no connection within {self.http.timeout_s}s: {url}")) from exc
                raise _Transient(Reject("http_connection", f"{type(exc).__name__}: {url}")) from exc
            except Urllib3Timeout as exc:
                what = "no answer" if isinstance(exc, ReadTimeoutError) else "no connection"
                raise _Transient(Reject("http_timeout", f"{what} within {self.http.timeout_s}s: {url}")) from exc
            except (ProtocolError, SSLError, HTTPError, OSError) as exc:
                if _timed_out(exc):
                    raise _Transient(Reject("http_timeout", f"body stalled over {self.http.timeout_s}s: {url}")) from exc
                raise _Transient(Reject("http_connection", f"{type(exc).__name__}: {url}")) from exc
        raise Reject("http_redirects", f"more than {self.http.max_redirects} redirects from {url}")

    # -- robots.txt -------------------------------------------------------------------------
    def _check_robots(self, url: str, target: Target) -> None:
        rules = self._robots_for(f"{target.scheme}://{target.host_header}")
        if not rules.can_fetch(self.http.user_agent, url):
            raise Reject("http_opt_out", f"robots.txt of {target.host_header} disallows {target.path.split('?')[0]}")

    def _robots_for(self, origin: str) -> RobotFileParser:
        """The site's rules, asked for once per process (a few thousand sites kept). RFC 9309: a
        4xx answer allows everything; a 5xx or no answer is a transient failure of this fetch (the
        sample is retried, then rejected with that reason; never fetched without the rules)."""
        with self._lock:
            lock = self._robots_locks.setdefault(origin, threading.Lock())
        with lock:
            with self._lock:
                if origin in self._robots:
                    self._robots.move_to_end(origin)
                    return self._robots[origin]
            try:
                rules = self._follow(f"{origin}/robots.txt", self._robots_answer, robots=False)
            except BaseException:
                with self._lock:   # asked again by the next sample; no lock kept per failing site
                    self._robots_locks.pop(origin, None)
                raise
            with self._lock:
                self._robots[origin] = rules
                while len(self._robots) > ROBOTS_HOSTS:
                    gone, _ = self._robots.popitem(last=False)
                    self._robots_locks.pop(gone, None)
        return rules

    def _robots_answer(self, resp, final_url: str) -> RobotFileParser:
        rules = RobotFileParser(final_url)
        if _is_transient_status(resp.status):
            raise _Transient(Reject("http_status", f"robots.txt: {resp.status} {resp.reason or ''}".strip()),
                             retry_after(resp.headers.get("Retry-After")))
        if resp.status >= 400:
            rules.allow_all = True
            return rules
        text = resp.read(ROBOTS_MAX_BYTES, decode_content=True).decode("utf-8", errors="replace")
        rules.parse(text.splitlines())
        return rules

    def _check_headers(self, resp, expect: str) -> None:
        status = f"{resp.status} {resp.reason or ''}".strip()
        if _is_transient_status(resp.status):
            raise _Transient(Reject("http_status", status), retry_after(resp.headers.get("Retry-After")))
        if resp.status >= 300:
            raise Reject("http_status", status)
        tags = resp.headers.getlist("X-Robots-Tag")
        if opted_out(tags, self.http.opt_out_directives, self.http.user_agent):
            raise Reject("http_opt_out", f"X-Robots-Tag: {'; '.join(tags)}")
        media = _media_type(resp.headers.get("Content-Type"))
        if not (media.startswith(f"{expect}/") or media in UNDECIDED_TYPES):
            raise Reject("http_content_type", f"expected {expect}/*, got {media}")
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.http.max_bytes:
            raise Reject("http_too_large", f"Content-Length {length} > {self.http.max_bytes} bytes")

    def _read_body(self, resp) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in resp.stream(CHUNK, decode_content=True):
            size += len(chunk)
            if size > self.http.max_bytes:
                raise Reject("http_too_large", f"body over {self.http.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _timed_out(exc: BaseException) -> bool:
    """A read timeout wrapped in another urllib3 error (a body that stalls mid-transfer)."""
    from urllib3.exceptions import ReadTimeoutError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ReadTimeoutError, socket.timeout, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__ or (exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], BaseException) else None)
    return False
