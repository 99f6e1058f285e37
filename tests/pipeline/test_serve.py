"""``mmpipe serve``: the real command in the foreground on loopback (one service for the module,
two model replicas), checked over HTTP: predictions equal ``predict``'s, bad requests get a 4xx
with a reason while the service keeps answering, a killed replica is replaced without losing a
request, the per-request timeout, the exported metrics, and a clean stop on SIGTERM."""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import numpy as np
import pytest

from pipeline.cli import predict_records
from pipeline.demo import make_demo
from pipeline.runner import run
from pipeline.serve_app import RequestError, ServeOptions, parse_request
from pipeline.serve_model import media_ref
from stages.base import Reject
from tests.conftest_http import body, loopback_server, network_guard, slow, status  # noqa: F401 (fixture)
from tests.pipeline.helpers import config
from tests.pipeline.test_metrics import free_port, scrape
from training.align import align
from training.train import train

MMPIPE = str(Path(sys.executable).with_name("mmpipe"))
MAX_RECORDS, MAX_BODY = 8, 1024 * 1024
TIMEOUT_S = 5
BAD_IDS = ["bad-garbage-audio", "bad-blank-image", "bad-silent-audio", "bad-empty-row"]


@dataclass
class Trained:
    folder: Path
    data: Path
    rows: dict[str, dict]     # the demo manifest's rows by id
    cfg: object
    config_path: Path
    model_dir: Path
    align_dir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A small model trained without Ray (in-process run, local training), and the config the
    service uses: the same stages; localhost fetchable, 127.0.0.1 not; a small media cap."""
    folder = tmp_path_factory.mktemp("serve")
    manifest = make_demo(folder / "data", n=48)
    overrides = {"execution": {"local_max_rows": 100_000},
                 "training": {"engine": "local", "epochs": 4, "fusion": "concat"},
                 "source": {"http": {"allow_hosts": ["localhost"], "retries": 0, "timeout_s": 30, "max_bytes": 100_000}},
                 "ray": {"metrics_export_port": free_port()}}
    cfg = config(folder, manifest, folder / "store", overrides)
    run(cfg, log=lambda s: None)
    result = train(cfg, str(folder / "store"))
    space = align(cfg.model_copy(update={"align": cfg.align.model_copy(update={"epochs": 30, "batch_size": 16, "dim": 32})}),
                  str(folder / "store"), name="space")
    rows = {r["id"]: r for r in map(json.loads, manifest.read_text().splitlines()) if "id" in r}
    return Trained(folder, manifest.parent, rows, cfg, folder / "config.yaml", Path(result.model_dir), space.model_dir)


@dataclass
class Service:
    proc: subprocess.Popen
    url: str
    ray_address: str
    log: Path

    def post(self, payload, path: str = "/predict", headers: dict | None = None) -> tuple[int, dict]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {"Content-Type": "application/json"})
        return _answer(req)

    def get(self, path: str) -> tuple[int, dict]:
        return _answer(urllib.request.Request(self.url + path))


def _answer(req: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def service(trained):
    port = free_port()
    log = trained.folder / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([MMPIPE, "serve", str(trained.config_path), "--model", str(trained.model_dir),
                                 "--port", str(port), "--replicas", "2", "--timeout-s", str(TIMEOUT_S),
                                 "--max-records", str(MAX_RECORDS), "--max-batch-size", "16",
                                 "--max-body-mb", str(MAX_BODY / 2 ** 20),
                                 "--align", str(trained.align_dir), "--store", str(trained.folder / "store")],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=trained.folder)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        address = re.search(r"Ray at (\S+);", log.read_text()).group(1)
        yield Service(proc, f"http://127.0.0.1:{port}", address, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()


def data_uri(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def request_record(t: Trained, rid: str) -> dict:
    """A manifest row as a request record: its media as data: URIs."""
    row = t.rows[rid]
    out = {"id": rid, "text": row.get("text")}
    for m, media_type in (("image", "image/jpeg"), ("audio", "audio/wav")):
        if row.get(m):
            out[m] = data_uri(t.data / row[m], media_type)
    return out


def good_ids(t: Trained, n: int) -> list[str]:
    return [rid for rid in t.rows if rid.startswith("s")][:n]


# -- pure functions (no service) ------------------------------------------------------------
def test_parse_request_refuses_what_a_client_got_wrong_with_a_reason():
    cases = [(b"{not json", 400, "invalid_json"), (b"[1, 2]", 422, "invalid_request"),
             (b'{"records": []}', 422, "invalid_request"), (b'{"records": [{"text": 3}]}', 422, "invalid_request"),
             (b'{"records": [{"video2": "x"}]}', 422, "invalid_request"),
             (b'{"records": [{"id": "a"}, {"id": "a"}]}', 422, "invalid_request"),
             (json.dumps({"records": [{"text": "t"}] * 9}).encode(), 422, "too_many_records"),
             (b"[" * 100_000, 400, "invalid_json")]
    for raw, code, error in cases:
        with pytest.raises(RequestError) as caught:
            parse_request(raw, max_records=8)
        assert (caught.value.status, caught.value.code) == (code, error), raw[:40]
        assert caught.value.detail
    assert parse_request(b'{"records": [{"text": "a"}, {"id": 7, "text": "b"}]}', 8) == [
        {"id": "0", "text": "a", "image": None, "audio": None, "video": None},
        {"id": 7, "text": "b", "image": None, "audio": None, "video": None}]


def test_media_refs_are_urls_or_decoded_data_uris_never_server_paths(tmp_path):
    assert media_ref("https://example.org/a.jpg", tmp_path / "x", 100) == "https://example.org/a.jpg"
    assert media_ref("data:image/png;base64," + base64.b64encode(b"abc").decode(), tmp_path / "0.image", 100) == "0.image"
    assert (tmp_path / "0.image").read_bytes() == b"abc"
    assert media_ref("data:,a%20b", tmp_path / "1.image", 100) == "1.image"
    assert (tmp_path / "1.image").read_bytes() == b"a b"
    for value, reason in [("/etc/passwd", "url_scheme"), ("file:///etc/passwd", "url_scheme"),
                          ("shard.tar#a.jpg", "url_scheme"), ("data:image/png;base64,!!", "bad_record"),
                          ("data:image/png;base64", "bad_record"),
                          ("data:;base64," + base64.b64encode(b"x" * 101).decode(), "bad_record")]:
        with pytest.raises(Reject) as caught:
            media_ref(value, tmp_path / "2.image", 100)
        assert caught.value.reason == reason, value
    assert not (tmp_path / "2.image").exists()


def test_serve_options_refuse_combinations_that_cannot_work():
    assert ServeOptions().problems() == []
    assert ServeOptions(min_replicas=1, max_replicas=4).problems() == []
    for options, words in [(ServeOptions(max_records=64, max_batch_size=32), "over --max-batch-size"),
                           (ServeOptions(max_replicas=4), "both --min-replicas and --max-replicas"),
                           (ServeOptions(min_replicas=5, max_replicas=4), "over --max-replicas"),
                           (ServeOptions(quantize="int8", replica_gpus=1), "for CPU replicas")]:
        assert len(options.problems()) == 1 and words in options.problems()[0]


def test_a_config_whose_stages_differ_from_training_refuses_to_start_in_one_line(trained, tmp_path):
    changed = trained.config_path.read_text().replace("encoder: hashed", "encoder: hashed\n      params: {word_features: 256}")
    other = tmp_path / "other.yaml"
    other.write_text(changed)
    cases = [([str(other), "--model", str(trained.model_dir)], "stage features.text is configured differently"),
             ([str(trained.config_path), "--model", str(tmp_path)], "no trained model at"),
             ([str(trained.config_path), "--model", str(trained.model_dir), "--max-records", "64"],
              "--max-records 64 is over --max-batch-size 32")]
    for args, message in cases:
        started = time.monotonic()
        proc = subprocess.run([MMPIPE, "serve", *args, "--port", str(free_port())], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmpipe: error: ") and message in lines[0], proc.stderr
        assert time.monotonic() - started < 30   # refused before Ray starts


# -- the running service --------------------------------------------------------------------
def test_predictions_equal_mmpipe_predict_across_batched_requests(trained, service, tmp_path, network_guard):
    ids = good_ids(trained, 8) + BAD_IDS
    manifest = trained.data / "same-as-served.jsonl"   # beside the media its rows name
    manifest.write_text("".join(json.dumps({k: v for k, v in trained.rows[i].items() if k != "label"}) + "\n"
                                for i in ids))
    cfg = trained.cfg.model_copy(update={"source": trained.cfg.source.model_copy(update={"path": str(manifest)})})
    predict_records(cfg, trained.model_dir, tmp_path / "pred.parquet")
    expected = {r["id"]: r for r in pq.read_table(tmp_path / "pred.parquet").to_pylist()}
    expected_rejects = {r["id"]: r["reason"] for r in
                        map(json.loads, (tmp_path / "pred.rejects.jsonl").read_text().splitlines())}
    assert len(expected) == 8 and set(expected_rejects) == set(BAD_IDS)

    # Three requests at once: the replicas batch them together.
    chunks = [ids[k::3] for k in range(3)]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda part: service.post({"records": [request_record(trained, i) for i in part]}), chunks))
    for part, (code, answer) in zip(chunks, answers):
        assert code == 200, answer
        assert [p["id"] for p in answer["predictions"]] == [i for i in part if i in expected]
        assert {r["id"]: r["reason"] for r in answer["rejects"]} == {i: expected_rejects[i] for i in part if i in expected_rejects}
        for p in answer["predictions"]:
            want = expected[p["id"]]
            assert p["label"] == want["prediction"]
            assert p["probs"] == pytest.approx({c: want[f"p_{c}"] for c in p["probs"]}, abs=1e-6)
            assert abs(sum(p["probs"].values()) - 1) < 1e-5


def test_every_kind_of_bad_request_gets_a_4xx_with_a_reason_and_the_service_keeps_serving(trained, service, network_guard):
    good = {"records": [request_record(trained, good_ids(trained, 1)[0])]}
    huge = json.dumps({"records": [{"text": "x" * (MAX_BODY + 10)}]}).encode()
    cases = [(b"{oops", 400, "invalid_json"),
             (b'"just a string"', 422, "invalid_request"),
             (json.dumps({"records": {"id": "a"}}).encode(), 422, "invalid_request"),
             (json.dumps({"records": [{"id": "a", "image": 5}]}).encode(), 422, "invalid_request"),
             (json.dumps({"records": [{"id": "a", "colour": "red"}]}).encode(), 422, "invalid_request"),
             (json.dumps({"records": [{"text": "t"}] * (MAX_RECORDS + 1)}).encode(), 422, "too_many_records"),
             (huge, 413, "body_too_large")]
    for raw, code, error in cases:
        got, answer = service.post(raw)
        assert (got, answer.get("error")) == (code, error), (raw[:60], answer)
        assert answer["detail"]
        assert service.post(good)[0] == 200   # still serving
    assert _chunked_post(service, huge) == (413, "body_too_large")   # no Content-Length: counted while read
    assert service.get("/predict")[0] == 405
    code, answer = service.get("/nowhere")
    assert (code, answer["error"]) == (404, "not_found")
    assert service.post(good)[0] == 200


def _chunked_post(service: Service, data: bytes) -> tuple[int, str]:
    host, port = service.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/predict", body=iter([data[k:k + 65536] for k in range(0, len(data), 65536)]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_records_the_stages_reject_come_back_with_pipeline_reason_codes(trained, service, network_guard):
    rid = good_ids(trained, 1)[0]
    row = trained.rows[rid]
    with loopback_server() as remote:
        image = remote.add("/a.jpg", body((trained.data / row["image"]).read_bytes(), "image/jpeg"))
        remote.add("/gone.jpg", status(404))
        fetched = {"id": "fetched", "text": row["text"], "image": image.replace("127.0.0.1", "localhost"),
                   "audio": data_uri(trained.data / row["audio"], "audio/wav")}
        records = [fetched, {**request_record(trained, rid), "id": "inline"},
                   {"id": "blocked", "image": image},                                   # 127.0.0.1: not allowed
                   {"id": "gone", "image": remote.url("/gone.jpg").replace("127.0.0.1", "localhost")},
                   {"id": "server-file", "image": "/etc/hostname"},
                   {"id": "not-base64", "text": "ok", "image": "data:image/jpeg;base64,%%%"},
                   {"id": "too-big", "image": "data:image/jpeg;base64," + base64.b64encode(b"\xff" * 150_000).decode()},
                   {"id": "empty", "text": "   "}]
        code, answer = service.post({"records": records})
        assert remote.hits("/a.jpg") == 1
    assert code == 200, answer
    predicted = {p["id"]: p for p in answer["predictions"]}
    assert set(predicted) == {"fetched", "inline"}
    assert predicted["fetched"]["probs"] == pytest.approx(predicted["inline"]["probs"], abs=1e-6)
    assert {r["id"]: r["reason"] for r in answer["rejects"]} == {
        "blocked": "url_blocked", "gone": "http_status", "server-file": "url_scheme",
        "not-base64": "bad_record", "too-big": "bad_record", "empty": "empty_record"}
    assert all(r["detail"] and "mmpipe-serve-" not in r["detail"] for r in answer["rejects"])


def test_healthz_and_metadata(trained, service, network_guard):
    code, health = service.get("/healthz")
    assert (code, health["status"]) == (200, "ok")
    code, meta = service.get("/metadata")
    saved = json.loads((trained.model_dir / "metrics.json").read_text())
    assert code == 200
    assert meta["classes"] == saved["classes"] and meta["modalities"] == saved["modalities"]
    assert meta["fusion"] == "concat" and meta["model"] == health["model"] == saved["name"]
    assert meta["stage_fingerprints"] == saved["stage_fingerprints"]
    assert "features_version" in meta and meta["quantize"] == "none"
    assert meta["limits"]["max_records"] == MAX_RECORDS


def _model_replicas(ray) -> set[str]:
    """The names of the model deployment's live replica actors."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::mmpipe#model#")}


def test_search_answers_as_mmpipe_search_does(service, trained, tmp_path):
    """``POST /search`` (served with --align): per query the results ``mmpipe search`` gives for it
    (same ids in the same order, same scores), query records the stages reject in ``rejects``, a
    modality the alignment does not map or a malformed request refused."""
    from pipeline.search import _single_query, search_records

    query = "waves and a coral reef by the shore, surf and tide"
    code, answer = service.post({"records": [{"id": "reef", "text": query},
                                             {"id": "inside", "image": "http://127.0.0.1/secret.jpg"}],
                                 "modality": "image", "k": 5}, path="/search")
    assert code == 200, answer
    (hit,) = answer["results"]
    assert hit["id"] == "reef" and len(hit["results"]) == 5 and all(r["id"] in trained.rows for r in hit["results"])
    cfg = _single_query(trained.cfg, {"text": query, "image": None, "audio": None}, tmp_path)
    (expected,) = search_records(cfg, str(trained.folder / "store"), trained.align_dir, "image", 5)
    assert [r["id"] for r in hit["results"]] == [r["id"] for r in expected["results"]]
    assert np.allclose([r["score"] for r in hit["results"]], [r["score"] for r in expected["results"]], atol=1e-5)
    assert [(r["id"], r["reason"]) for r in answer["rejects"]] == [("inside", "url_blocked")]
    for bad, status, error in [({"records": [{"text": "x"}], "modality": "smell"}, 422, "invalid_request"),
                               ({"records": [{"text": "x"}], "modality": "video"}, 422, "modality_not_aligned"),
                               ({"records": [{"text": "x"}], "modality": "image", "k": 0}, 422, "invalid_request"),
                               (b"{not json", 400, "invalid_json")]:
        code, answer = service.post(bad, path="/search")
        assert (code, answer["error"]) == (status, error), answer


def test_a_replica_killed_under_load_is_replaced_and_no_request_is_lost(trained, service):
    """A request known to be inside a replica's batch (its image is still being fetched) when that
    replica is killed is answered all the same, as is every request sent while Serve notices the
    death and starts a replacement."""
    import ray

    rid = good_ids(trained, 1)[0]
    payload = {"records": [request_record(trained, i) for i in good_ids(trained, 2)]}
    code, first = service.post(payload)
    assert code == 200
    want = _flat(first)
    answers: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(service.post(payload))

    image = (trained.data / trained.rows[rid]["image"]).read_bytes()
    ray.init(address=service.ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        with loopback_server() as remote, ThreadPoolExecutor(1) as pool:
            url = remote.add("/slow.jpg", slow(1.5, body(image, "image/jpeg"))).replace("127.0.0.1", "localhost")
            before = {name: ray.get_actor(name, namespace="serve") for name in _model_replicas(ray)}
            assert len(before) == 2
            pending = pool.submit(service.post, {"records": [{"id": "in-flight", "text": trained.rows[rid]["text"],
                                                              "image": url}]})
            while remote.hits("/slow.jpg") == 0:
                time.sleep(0.02)
            # The one replica with a request in flight is the one fetching the slow image: kill it,
            # then load the service while Serve notices and replaces it.
            busy = [name for name, actor in before.items() if ray.get(actor.get_num_ongoing_requests.remote()) > 0]
            assert len(busy) == 1, busy
            victim = busy[0]
            ray.kill(before[victim], no_restart=True)
            clients = [threading.Thread(target=client) for _ in range(2)]
            for c in clients:
                c.start()
            code, in_flight = pending.result(timeout=60)
            fetches = remote.hits("/slow.jpg")
        deadline = time.monotonic() + 60
        while not (len(now := _model_replicas(ray)) == 2 and victim not in now) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)   # the replacement takes requests too
        stop.set()
        for c in clients:
            c.join(60)
        after = _model_replicas(ray)
    finally:
        stop.set()
        ray.shutdown()
    assert code == 200 and [p["id"] for p in in_flight["predictions"]] == ["in-flight"], in_flight
    assert fetches == 2   # fetched by the killed replica, then by the one the request was sent to again
    assert len(after) == 2 and victim not in after and len(after - set(before)) == 1, (before, after)
    failed = [a for a in answers if a[0] != 200]
    assert answers and not failed, failed[:3]
    for _, answer in answers:
        assert _flat(answer) == pytest.approx(want, abs=1e-6)


def _flat(answer: dict) -> dict[tuple[str, str], float]:
    return {(p["id"], c): v for p in answer["predictions"] for c, v in p["probs"].items()}


def test_a_request_past_the_timeout_gets_504_and_the_next_one_is_answered(trained, service, network_guard):
    rid = good_ids(trained, 1)[0]
    image = (trained.data / trained.rows[rid]["image"]).read_bytes()
    with loopback_server() as remote:
        url = remote.add("/slow.jpg", slow(TIMEOUT_S + 3, body(image, "image/jpeg"))).replace("127.0.0.1", "localhost")
        started = time.monotonic()
        code, answer = service.post({"records": [{"id": "slow", "image": url}]})
        took = time.monotonic() - started
        assert (code, answer["error"]) == (504, "timeout")
        assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 3
        code, answer = service.post({"records": [request_record(trained, rid)]})
        assert code == 200 and answer["predictions"][0]["id"] == rid
        time.sleep(max(0.0, TIMEOUT_S + 3.5 - (time.monotonic() - started)))   # let the slow fetch end


def test_request_and_batch_metrics_are_exported_through_ray(trained, service, network_guard):
    """Requests by route and status, latency, rejects by reason and batch sizes, scraped from the
    node's Prometheus endpoint (a killed replica's series go with it: this test makes its own)."""
    port = trained.cfg.ray.metrics_export_port
    assert service.post(b"{oops")[0] == 400
    assert service.get("/healthz")[0] == 200
    code, answer = service.post({"records": [request_record(trained, good_ids(trained, 1)[0]),
                                             {"id": "blocked", "image": "http://127.0.0.1:9/a.jpg"},
                                             {"id": "bad", "image": "data:image/png;base64,%%"}]})
    assert code == 200 and len(answer["rejects"]) == 2

    def counts() -> tuple[dict, set, float, float]:
        families = scrape(port)
        by_status: dict = {}
        for s in families.get("ray_mmpipe_serve_requests", []):
            if s.name == "ray_mmpipe_serve_requests_total":
                key = (s.labels["route"], s.labels["status"])
                by_status[key] = by_status.get(key, 0) + s.value
        rejects = {s.labels["reason"] for s in families.get("ray_mmpipe_serve_rejects", [])
                   if s.name == "ray_mmpipe_serve_rejects_total"}
        batches = sum(s.value for s in families.get("ray_mmpipe_serve_batch_records", [])
                      if s.name == "ray_mmpipe_serve_batch_records_count")
        timed = sum(s.value for s in families.get("ray_mmpipe_serve_request_seconds", [])
                    if s.name == "ray_mmpipe_serve_request_seconds_count" and s.labels["route"] == "/predict")
        return by_status, rejects, batches, timed

    deadline = time.monotonic() + 60   # the workers ship metrics to the agent every few seconds
    while True:
        by_status, rejects, batches, timed = counts()
        done = {("/predict", "200"), ("/predict", "400"), ("/healthz", "200")} <= set(by_status) \
            and {"url_blocked", "bad_record"} <= rejects and batches >= 1
        if done or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done, (by_status, rejects, batches)
    assert timed >= by_status[("/predict", "200")] + by_status[("/predict", "400")]


def test_sigterm_stops_the_service_cleanly(service):
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(90) == 0
    text = service.log.read_text()
    assert "mmpipe serve: stopped" in text and "Traceback" not in text
    with pytest.raises(OSError):
        urllib.request.urlopen(service.url + "/healthz", timeout=5)


@pytest.mark.cluster
def test_with_address_it_deploys_to_that_cluster_and_leaves_it_running(trained, tmp_path):
    """``--address``: the application runs on an existing cluster (a one-node ``ray start`` with
    token authentication on, as docs/cluster.md runs it; the token from RAY_AUTH_TOKEN); SIGTERM
    deletes this application only, the cluster goes on. Run by ``make test-cluster``."""
    import secrets

    from tests.cluster.test_cluster import free_ports, node_cmd, stop_cluster, wait_for_nodes

    gcs_port, dashboard_port, port = free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/mms")   # short: unix socket paths
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen(node_cmd(temp_dir, True, gcs_port, dashboard_port), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "serve.log"
    try:
        wait_for_nodes(f"http://127.0.0.1:{dashboard_port}", 1, [head], token=token)
        with log.open("w") as err:
            proc = subprocess.Popen([MMPIPE, "serve", str(trained.config_path), "--model", str(trained.model_dir),
                                     "--address", f"127.0.0.1:{gcs_port}", "--port", str(port), "--replica-cpus", "0.5"],
                                    stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 180
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        service = Service(proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{gcs_port}", log)
        assert service.get("/healthz")[0] == 200
        rid = good_ids(trained, 1)[0]
        code, answer = service.post({"records": [request_record(trained, rid)]})
        assert code == 200 and answer["predictions"][0]["id"] == rid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        assert head.poll() is None                                  # the cluster goes on
        deadline = time.monotonic() + 30
        while (code := _status_of(service.url + "/healthz")) == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert code == 404                                          # without this application
        assert token not in log.read_text()                         # never printed
    finally:
        stop_cluster([head], [temp_dir])
        shutil.rmtree(temp_dir, ignore_errors=True)


def _status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
