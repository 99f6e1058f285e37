"""Server-side request forgery: URLs that point inside the cluster are refused (``url_blocked``)
before any connection, on every redirect hop, and the connection goes to the address that was
checked. The network guard fails a test that tries to reach anything beyond loopback."""
from __future__ import annotations

import ipaddress

import pytest

from tests.conftest_http import body, http_server, network_guard, redirect  # noqa: F401

from core.config import HttpConfig
from stages.base import Reject
from stages.fetch import Fetcher, address_problem

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
HTTP = HttpConfig(timeout_s=0.5, retries=0, backoff_s=0.0)
PUBLIC = "93.184.216.34"   # a public address: the guard refuses to connect to it


def blocked(fetcher: Fetcher, url: str) -> Reject:
    with pytest.raises(Reject) as info:
        fetcher.fetch(url, "image")
    return info.value


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0x7f.1", "2130706433", "127.1", "017700000001",
                                  "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                                  "224.0.0.1", "[::ffff:127.0.0.1]", "[fe80::1]", "[fc00::1]", "[2002:7f00:1::]",
                                  "[64:ff9b::a00:1]", "[ff02::1]"])
def test_addresses_inside_the_cluster_are_refused_in_any_spelling(network_guard, http_server, host):
    http_server.add("/x.png", body(PNG, "image/png"))
    port = http_server.base_url.rsplit(":", 1)[1]
    with Fetcher(HTTP) as f:
        r = blocked(f, f"http://{host}:{port}/x.png")
    assert r.reason == "url_blocked", r
    assert http_server.hits("/x.png") == 0   # refused before any connection


def test_a_public_name_that_resolves_inside_is_refused(network_guard, http_server):
    network_guard.names["images.example.com"] = "127.0.0.1"
    url = http_server.url("/x.png").replace("127.0.0.1", "images.example.com")
    http_server.add("/x.png", body(PNG, "image/png"))
    with Fetcher(HTTP) as f:
        r = blocked(f, url)
    assert r.reason == "url_blocked" and "images.example.com resolves to 127.0.0.1 (loopback)" in r.detail


def test_a_redirect_from_an_allowed_host_to_a_blocked_one_is_refused(network_guard, http_server):
    network_guard.names["cdn.example.com"] = "127.0.0.1"
    port = http_server.base_url.rsplit(":", 1)[1]
    http_server.add("/real.png", body(PNG, "image/png"))
    http_server.add("/hop", redirect(f"http://127.0.0.1:{port}/real.png"))
    allowed = HTTP.model_copy(update={"allow_hosts": ["cdn.example.com"]})
    with Fetcher(allowed) as f:
        assert f.fetch(f"http://cdn.example.com:{port}/real.png", "image").data == PNG   # the allowed host itself
        r = blocked(f, f"http://cdn.example.com:{port}/hop")
    assert r.reason == "url_blocked" and "127.0.0.1" in r.detail
    assert http_server.hits("/hop") == 1 and http_server.hits("/real.png") == 1   # the redirect was not followed


def test_the_connection_goes_to_the_address_that_was_checked(network_guard):
    """DNS rebinding: a name that resolves to a public address when checked and to loopback
    afterwards. The fetch connects to the checked address (the guard refuses it: no packet
    leaves) and never looks the name up again."""
    network_guard.names["rebind.example.com"] = [PUBLIC, "127.0.0.1"]
    with Fetcher(HTTP) as f:
        r = blocked(f, "http://rebind.example.com/x.png")
    assert r.reason == "http_connection"
    assert network_guard.attempts == [f"connect to {PUBLIC}"]   # the checked address, not loopback
    assert network_guard.lookups.count("rebind.example.com") == 1
    network_guard.attempts.clear()


def test_allow_private_networks_and_allowed_cidrs_lift_the_block(network_guard, http_server):
    url = http_server.add("/x.png", body(PNG, "image/png"))
    for update in ({"allow_private_networks": True}, {"allow_hosts": ["127.0.0.0/8"]}, {"allow_hosts": ["127.0.0.1"]}):
        with Fetcher(HTTP.model_copy(update=update)) as f:
            assert f.fetch(url, "image").data == PNG, update
    with Fetcher(HTTP.model_copy(update={"allow_hosts": ["10.0.0.0/8"]})) as f:
        assert blocked(f, url).reason == "url_blocked"


def test_allow_hosts_rejects_a_bad_cidr():
    with pytest.raises(ValueError, match="not a CIDR"):
        HttpConfig(allow_hosts=["10.0.0.0/33"])


@pytest.mark.parametrize("addr, problem", [("8.8.8.8", None), ("2606:4700::1111", None), ("127.0.0.2", "loopback"),
                                           ("::ffff:10.1.2.3", "private"), ("2002:a9fe:a9fe::", "link-local"),
                                           ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"), ("198.18.0.1", "private"),
                                           ("240.0.0.1", "reserved"), ("::", "unspecified")])
def test_address_problems(addr, problem):
    assert address_problem(ipaddress.ip_address(addr)) == problem


def test_credentials_in_a_url_never_reach_a_reject(network_guard, http_server):
    port = http_server.base_url.rsplit(":", 1)[1]
    with Fetcher(HTTP) as f:
        r = blocked(f, f"http://alice:s3cret@127.0.0.1:{port}/x.png")
    assert r.reason == "url_blocked" and "s3cret" not in r.detail and "alice" not in r.detail and "***@" in r.detail


def test_a_reject_record_never_stores_credentials_from_a_reference():
    from core.schema import reject_record

    rec = reject_record({"id": "x", "reject_stage": "ingest.scan", "reject_reason": "http_status",
                         "reject_detail": "404 for https://bob:hunter2@cdn.example.com/a.jpg",
                         "image_ref": "https://bob:hunter2@cdn.example.com/a.jpg"}, "run")
    assert "hunter2" not in rec["detail"] + rec["ref"] and "bob" not in rec["ref"]
    assert "https://***@cdn.example.com/a.jpg" in rec["ref"]


def test_run_records_never_hold_credentials(tmp_path):
    """The resolved config in a run record: user:password@ in any URL and the values of keys that
    name a secret are replaced (keys such as ``tokenizer`` are not secrets)."""
    from core.config import redacted
    from pipeline.demo import make_demo
    from pipeline.runner import run
    from tests.pipeline.helpers import config

    dump = {"store": "s3://AKIAX:s3cr3t@bucket/prefix", "ray": {"address": "http://admin:hunter2@head:8265"},
            "stages": {"features": {"text": {"params": {"api_key": "sk-123", "hf_token": "hf_abc", "tokenizer": "bert",
                                                        "max_tokens": 8, "password": None}}}},
            "list": ["https://u:p@example.com/a.jpg", 3]}
    assert redacted(dump) == {
        "store": "s3://***@bucket/prefix", "ray": {"address": "http://***@head:8265"},
        "stages": {"features": {"text": {"params": {"api_key": "***", "hf_token": "***", "tokenizer": "bert",
                                                    "max_tokens": 8, "password": None}}}},
        "list": ["https://***@example.com/a.jpg", 3]}
    manifest = make_demo(tmp_path / "data", n=4)
    cfg = config(tmp_path, manifest, tmp_path / "store", {
        "execution": {"local_max_rows": 100}, "source": {"http": {"user_agent": "bot (+https://me:pw@example.com)"}}})
    record = run(cfg, log=lambda s: None).record
    text = next((tmp_path / "store" / "runs").glob("*.json")).read_text()
    assert "me:pw" not in text and record["config"]["source"]["http"]["user_agent"] == "bot (+https://***@example.com)"
