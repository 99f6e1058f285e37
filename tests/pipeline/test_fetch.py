"""stages.fetch against a loopback HTTP server: every URL accepted or rejected with its reason."""
from __future__ import annotations

import socket
import time

import pytest

from tests.conftest_http import body, fail_first, http_server, network_guard, redirect, slow, stalled_body, status  # noqa: E402,F401

from core.config import HttpConfig  # noqa: E402
from stages.fetch import FetchResult, Fetcher  # noqa: E402
from stages.base import Reject  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
MAX_BYTES = 4096
# The loopback server is inside the network fetching refuses by default (tests/pipeline/test_url_safety.py).
HTTP = HttpConfig(timeout_s=0.3, retries=2, backoff_s=0.01, max_bytes=MAX_BYTES, max_redirects=3, concurrency=4,
                  allow_hosts=["127.0.0.1"])
pytestmark = pytest.mark.usefixtures("network_guard")


@pytest.fixture
def fetcher():
    with Fetcher(HTTP) as f:
        yield f


def reason_of(fetcher: Fetcher, url: str, expect: str = "image") -> Reject:
    with pytest.raises(Reject) as info:
        fetcher.fetch(url, expect)
    return info.value


def test_good_image(http_server, fetcher):
    url = http_server.add("/good.png", body(PNG, "image/png; charset=binary"))
    result = fetcher.fetch(url, "image")
    assert result == FetchResult(data=PNG, content_type="image/png", final_url=url, attempts=1)


def test_octet_stream_left_to_the_decoder(http_server, fetcher):
    url = http_server.add("/blob", body(b"RIFF....", "application/octet-stream"))
    assert fetcher.fetch(url, "audio").data == b"RIFF...."


def test_wrong_content_type(http_server, fetcher):
    url = http_server.add("/page.html", body(b"<html></html>", "text/html"))
    r = reason_of(fetcher, url)
    assert r.reason == "http_content_type" and "text/html" in r.detail
    assert reason_of(fetcher, http_server.add("/a.png", body(PNG, "image/png")), "audio").reason == "http_content_type"
    assert http_server.hits("/page.html") == 1


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "/local/x.png", "gopher://h/x"])
def test_only_http_and_https(fetcher, url):
    assert reason_of(fetcher, url).reason == "url_scheme"


def test_404_not_retried(http_server, fetcher):
    url = http_server.add("/missing.png", status(404))
    r = reason_of(fetcher, url)
    assert (r.reason, r.detail) == ("http_status", "404 Not Found")
    assert http_server.hits("/missing.png") == 1


def test_500_then_200_is_retried(http_server, fetcher):
    url = http_server.add("/flaky.png", fail_first(1, status(500), body(PNG, "image/png")))
    result = fetcher.fetch(url, "image")
    assert result.data == PNG and result.attempts == 2
    assert http_server.hits("/flaky.png") == 2


def test_429_is_retried(http_server, fetcher):
    url = http_server.add("/busy.png", fail_first(2, status(429), body(PNG, "image/png")))
    assert fetcher.fetch(url, "image").attempts == 3
    assert http_server.hits("/busy.png") == 3


def test_always_500_gives_up_after_retries(http_server, fetcher):
    url = http_server.add("/broken.png", status(500))
    r = reason_of(fetcher, url)
    assert r.reason == "http_status" and r.detail.startswith("500 Internal Server Error")
    assert http_server.hits("/broken.png") == 1 + HTTP.retries


def test_slow_server_times_out_and_is_retried(http_server, fetcher):
    url = http_server.add("/slow.png", slow(1.0, body(PNG, "image/png")))
    start = time.perf_counter()
    assert reason_of(fetcher, url).reason == "http_timeout"
    assert time.perf_counter() - start < 2.5
    assert http_server.hits("/slow.png") == 1 + HTTP.retries


def test_body_stalling_mid_transfer_times_out(http_server, fetcher):
    url = http_server.add("/stall.png", stalled_body(PNG, 1.0, "image/png"))
    assert reason_of(fetcher, url).reason == "http_timeout"


def test_connection_refused_is_retried_then_rejected(fetcher):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = reason_of(fetcher, f"http://127.0.0.1:{port}/x.png")
    assert r.reason == "http_connection" and f"after {1 + HTTP.retries} attempts" in r.detail


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "streamed"])
def test_oversized(http_server, fetcher, content_length):
    url = http_server.add("/big.png", body(b"x" * (MAX_BYTES + 1), "image/png", content_length=content_length))
    r = reason_of(fetcher, url)
    assert r.reason == "http_too_large"
    assert ("Content-Length" in r.detail) == content_length
    assert http_server.hits("/big.png") == 1


def test_exactly_max_bytes_is_accepted(http_server, fetcher):
    url = http_server.add("/edge.png", body(b"x" * MAX_BYTES, "image/png", content_length=False))
    assert len(fetcher.fetch(url, "image").data) == MAX_BYTES


def test_good_redirect(http_server, fetcher):
    target = http_server.add("/real.png", body(PNG, "image/png"))
    url = http_server.add("/hop", redirect("/real.png"))
    result = fetcher.fetch(url, "image")
    assert result.final_url == target and result.data == PNG


def test_redirect_chain_over_the_limit(http_server, fetcher):
    for i in range(HTTP.max_redirects + 2):
        http_server.add(f"/r{i}", redirect(f"/r{i + 1}"))
    http_server.add(f"/r{HTTP.max_redirects + 2}", body(PNG, "image/png"))
    assert reason_of(fetcher, http_server.url("/r0")).reason == "http_redirects"
    assert http_server.hits("/r0") == 1


def test_redirect_to_another_scheme(http_server, fetcher):
    url = http_server.add("/to-ftp", redirect("ftp://127.0.0.1/x.png"))
    assert reason_of(fetcher, url).reason == "url_scheme"


def test_fetch_many_keeps_order(http_server):
    good = http_server.add("/good.png", body(PNG, "image/png"))
    audio = http_server.add("/a.flac", body(b"fLaC", "audio/flac"))
    missing = http_server.add("/missing", status(404))
    slow_url = http_server.add("/slow.png", slow(1.0, body(PNG, "image/png")))
    items = [(good, "image"), (missing, "image"), ("ftp://x/y.png", "image"), (slow_url, "image"), (audio, "audio")]
    with Fetcher(HTTP.model_copy(update={"retries": 0})) as f:
        out = f.fetch_many(items)
    assert [r.reason if isinstance(r, Reject) else r.data for r in out] == [
        PNG, "http_status", "url_scheme", "http_timeout", b"fLaC"]
    assert f.fetch_many([]) == []


def test_expect_must_be_a_media_kind(fetcher):
    with pytest.raises(ValueError):
        fetcher.fetch("http://127.0.0.1/x", "text")


def test_fetch_many_reuses_its_threads(http_server):
    good = http_server.add("/good.png", body(PNG, "image/png"))
    with Fetcher(HTTP.model_copy(update={"concurrency": 2})) as f:
        for _ in range(3):
            assert all(r.data == PNG for r in f.fetch_many([(good, "image")] * 4))
        assert len(f._sessions) <= 2


@pytest.mark.parametrize("tags, out", [
    (["noai"], True), (["noimageai, nofollow"], True), (["noindex"], True), (["mmpipe: noai"], True),
    (["*: noimageindex"], True), (["otherbot: noai", "nofollow"], False), (["nofollow, noarchive"], False), ([], False),
    (["otherbot: noai", "NoAI"], True)])
def test_x_robots_tag_opt_out(http_server, fetcher, tags, out):
    url = http_server.add("/tagged.png", body(PNG, "image/png", headers=[("X-Robots-Tag", t) for t in tags]))
    if out:
        r = reason_of(fetcher, url)
        assert r.reason == "http_opt_out" and "X-Robots-Tag" in r.detail
    else:
        assert fetcher.fetch(url, "image").data == PNG


def test_opt_out_directives_can_be_turned_off(http_server):
    url = http_server.add("/tagged.png", body(PNG, "image/png", headers=[("X-Robots-Tag", "noai")]))
    with Fetcher(HTTP.model_copy(update={"opt_out_directives": []})) as f:
        assert f.fetch(url, "image").data == PNG


def test_retry_after_is_waited_for_and_a_long_one_is_not(http_server, fetcher):
    url = http_server.add("/busy.png", fail_first(1, body(b"", "text/plain", status=503, headers=[("Retry-After", "1")]),
                                                  body(PNG, "image/png")))
    start = time.perf_counter()
    assert fetcher.fetch(url, "image").attempts == 2
    assert time.perf_counter() - start >= 1.0   # not the 0.01 s backoff: the server asked for a second
    later = http_server.add("/later.png", body(b"", "text/plain", status=429, headers=[("Retry-After", "3600")]))
    r = reason_of(fetcher, later)
    assert r.reason == "http_status" and "Retry-After 3600 s is over max_retry_after_s" in r.detail
    assert http_server.hits("/later.png") == 1


def test_per_host_concurrency_and_rate(http_server):
    """A crawl's concurrency is spread over hosts: one host gets per_host_concurrency requests at a
    time and per_host_rate a second at most."""
    import threading

    lock, now, peak = threading.Lock(), [0], [0]

    def counted(h):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.15)
        with lock:
            now[0] -= 1
        body(PNG, "image/png")(h)

    url = http_server.add("/c.png", counted)
    with Fetcher(HTTP.model_copy(update={"concurrency": 8, "per_host_concurrency": 2})) as f:
        assert all(r.data == PNG for r in f.fetch_many([(url, "image")] * 8))
    assert peak[0] == 2
    fast = http_server.add("/r.png", body(PNG, "image/png"))
    with Fetcher(HTTP.model_copy(update={"concurrency": 8, "per_host_rate": 20.0})) as f:
        start = time.perf_counter()
        assert all(r.data == PNG for r in f.fetch_many([(fast, "image")] * 6))
        assert time.perf_counter() - start >= 5 / 20.0   # 6 starts, 1/20 s apart


ROBOTS = HTTP.model_copy(update={"robots_txt": True})


def robots(text: str) -> object:
    return body(text.encode(), "text/plain")


def test_robots_txt_is_honoured_when_turned_on(http_server):
    http_server.add("/robots.txt", robots("User-agent: otherbot\nDisallow: /\n\n"
                                          "User-agent: mmpipe\nDisallow: /private/\n"))
    public = http_server.add("/public/a.png", body(PNG, "image/png"))
    private = http_server.add("/private/b.png", body(PNG, "image/png"))
    moved = http_server.add("/moved.png", redirect(private))
    with Fetcher(ROBOTS) as f:
        assert [r.data for r in f.fetch_many([(public, "image")] * 3)] == [PNG] * 3
        for url in (private, moved):   # a redirect into a disallowed path is caught on its hop
            r = reason_of(f, url)
            assert r.reason == "http_opt_out" and "robots.txt of 127.0.0.1" in r.detail and "/private/b.png" in r.detail
    assert http_server.hits("/private/b.png") == 0
    assert http_server.hits("/robots.txt") == 1      # once per site and process
    with Fetcher(HTTP) as f:                         # off by default: never asked for
        assert f.fetch(private, "image").data == PNG
    assert http_server.hits("/robots.txt") == 1


def test_robots_txt_missing_allows_and_unreachable_retries_then_rejects(http_server):
    url = http_server.add("/a.png", body(PNG, "image/png"))
    with Fetcher(ROBOTS) as f:
        assert f.fetch(url, "image").data == PNG     # 404 robots.txt: everything allowed
    http_server.add("/robots.txt", status(503))
    with Fetcher(ROBOTS) as f:
        r = reason_of(f, url)
    assert r.reason == "http_status" and "robots.txt: 503" in r.detail and "after 3 attempts" in r.detail
    assert http_server.hits("/a.png") == 1           # never fetched without the site's rules
    assert http_server.hits("/robots.txt") == 1 + 3    # the 404, then the 503 once per attempt
