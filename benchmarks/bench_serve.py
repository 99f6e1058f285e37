"""Serving: ``mmpipe serve`` on loopback at 1, 8 and 32 concurrent clients against calling the same
``Predictor`` (stages + model) in-process on the same records; then dynamic int8 quantisation.

Model: the demo config's stages (weight-free encoders, no augmentation), trained in-process
(``training.engine: local``) on ``--n`` demo rows. Requests: one record each, media as data: URIs
(image + audio + text); 10 % of the requests are bad, in turn: not JSON (400), a wrong type (422),
a corrupt image (200, the record in ``rejects``). The service runs in its own process (the real
command, ``--replicas`` model replicas); the clients are threads of this process, each with a
keep-alive connection, so on a 2-core machine they share the cores with the service.

In-process baseline: the same ``Predictor`` (the code a replica runs), one request at a time in
this process, over the same request list (bad JSON and wrong types never reach a model: skipped).

Int8: the held-out (val + test split) records through the stages once, then the fp32 and the int8 model over the
features: accuracy, labels that agree, the largest probability change, model forward time.

Run: .venv/bin/python benchmarks/bench_serve.py [--n 300] [--seconds 20] [--replicas 2]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from common import ROOT, Report, Timer, demo_data, pipeline_config, work_dir

MMPIPE = str(Path(sys.executable).with_name("mmpipe"))
LEVELS = (1, 8, 32)
BAD_EVERY = 10   # one request in ten is bad


def trained_model(n: int) -> tuple[Path, Path, object]:
    """(config file, model folder, config) for the demo stages trained on ``n`` rows, cached."""
    from pipeline.runner import run
    from training.train import train

    folder = work_dir(f"serve-{n}", fresh=False)
    manifest = demo_data(n)
    cfg = pipeline_config(manifest, folder / "store", num_cpus=2,
                          extra={"execution.local_max_rows": 1_000_000, "training.engine": "local",
                                 "training.epochs": 15})
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    models = sorted((folder / "store" / "models").glob("*/model.pt"))
    if not models:
        run(cfg, log=lambda _: None)
        train(cfg, str(folder / "store"))
        models = sorted((folder / "store" / "models").glob("*/model.pt"))
    return config_path, models[0].parent, cfg


@dataclass
class Call:
    kind: str          # good | corrupt | bad_json | bad_type
    body: bytes
    record: dict | None = None


def calls(manifest: Path) -> list[Call]:
    """One request per good demo row, with a bad one in place of every tenth."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    good = [r for r in rows if r.get("id", "").startswith("s") and r.get("image") and r.get("audio")]
    out = []
    for k, r in enumerate(good):
        record = {"id": r["id"], "text": r.get("text"),
                  "image": _data_uri(manifest.parent / r["image"], "image/jpeg"),
                  "audio": _data_uri(manifest.parent / r["audio"], "audio/wav")}
        kind = ("corrupt", "bad_json", "bad_type")[(k // BAD_EVERY) % 3] if k % BAD_EVERY == BAD_EVERY - 1 else "good"
        if kind == "corrupt":
            record["image"] = "data:image/jpeg;base64," + base64.b64encode(random.Random(k).randbytes(4000)).decode()
        body = json.dumps({"records": [record]}).encode()
        if kind == "bad_json":
            body = body[: len(body) // 2]
        elif kind == "bad_type":
            body = json.dumps({"records": [{**record, "text": 12}]}).encode()
        out.append(Call(kind, body, record if kind in ("good", "corrupt") else None))
    return out


def _data_uri(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000, q[98] * 1000


# -- the service --------------------------------------------------------------------------------
def start_service(config: Path, model: Path, port: int, args, quantize: str) -> subprocess.Popen:
    log = (work_dir("serve-logs", fresh=False) / f"serve-{quantize}.log").open("w")
    proc = subprocess.Popen([MMPIPE, "serve", str(config), "--model", str(model), "--port", str(port),
                             "--replicas", str(args.replicas), "--quantize", quantize], stderr=log,
                            stdout=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 180
    while "Ctrl-C stops" not in Path(log.name).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mmpipe serve did not start:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def stop_service(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def load(port: int, requests: list[Call], clients: int, seconds: float) -> dict:
    """``clients`` threads sending ``requests`` round-robin for ``seconds``: latency per kind, statuses."""
    results: list[tuple[str, int, float, int]] = []   # kind, status, seconds, records predicted
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    next_call = iter(range(10 ** 9))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                call = requests[next(next_call) % len(requests)]
            started = time.perf_counter()
            conn.request("POST", "/predict", body=call.body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            took = time.perf_counter() - started
            with lock:
                results.append((call.kind, resp.status, took, len(answer.get("predictions", []))))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"wall": wall, "results": results}


# -- in-process ---------------------------------------------------------------------------------
def in_process(cfg, model: Path, requests: list[Call], seconds: float, quantize: str = "none") -> dict:
    from pipeline.serve_model import Predictor

    predictor = Predictor(cfg, model, quantize)
    usable = [c for c in requests if c.record is not None]
    predictor.predict_batch([[usable[0].record]])   # warm-up, as the service's first request is
    results = []
    stop_at = time.monotonic() + seconds
    k = 0
    started = time.perf_counter()
    while time.monotonic() < stop_at:
        call = usable[k % len(usable)]
        t = time.perf_counter()
        answer = predictor.predict_batch([[call.record]])[0]
        results.append((call.kind, 200, time.perf_counter() - t, len(answer["predictions"])))
        k += 1
    return {"wall": time.perf_counter() - started, "results": results}


def row(report: Report, where: str, clients: int | str, run: dict) -> None:
    results = run["results"]
    by_status: dict[str, int] = {}
    for kind, status, _, _ in results:
        by_status[f"{kind} {status}"] = by_status.get(f"{kind} {status}", 0) + 1
    good = [s for kind, status, s, _ in results if kind == "good"]
    p50, p95, p99 = percentiles(good)
    a50, a95, a99 = percentiles([s for _, _, s, _ in results])
    predicted = sum(n for *_, n in results)
    server_errors = sum(1 for _, status, _, _ in results if status >= 500)
    report.add(where, clients, len(results), len(results) / run["wall"], predicted / run["wall"], p50, p95, p99,
               f"{a50:.1f} / {a95:.1f} / {a99:.1f}", server_errors,
               ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())))


# -- int8 ---------------------------------------------------------------------------------------
def quantisation(cfg, model: Path, manifest: Path, store: Path, report: Report) -> None:
    import numpy as np
    import pyarrow.compute as pc
    import torch
    from deltalake import DeltaTable

    from pipeline.predict import Featurizer, read_model_metrics
    from pipeline.sources import read_source
    from pipeline.serve_model import quantize_int8
    from training.data import to_arrays
    from training.loop import predict_proba
    from training.predict import load_model

    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "split", "aug"])
    held_out = pc.field("split").isin(["val", "test"]) & (pc.field("aug") == 0)
    test_ids = set(feats.filter(held_out)["id"].to_pylist())
    lines = [line for line in manifest.read_text().splitlines() if json.loads(line).get("id") in test_ids]
    test_manifest = manifest.with_name("held-out.jsonl")
    test_manifest.write_text("\n".join(lines) + "\n")
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": str(test_manifest)})})
    fp32 = load_model(model)
    table = Featurizer(cfg, read_model_metrics(model)["stage_fingerprints"], fp32.spec.modalities)(
        read_source(cfg.source)).table
    int8 = quantize_int8(load_model(model))
    arrays = to_arrays(table, fp32.spec.dims)
    labels = np.array([fp32.classes.index(v) if v in fp32.classes else -1 for v in table["label"].to_pylist()])
    torch.set_num_threads(1)
    out = {}
    for name, loaded in (("fp32", fp32), ("int8", int8)):
        probs, _ = predict_proba(loaded.model, arrays, 1024)
        one = {k: v[:1] for k, v in arrays.items()}
        batch = {k: v[:32] for k, v in arrays.items()}
        timings = {}
        for label, sample in (("1", one), ("32", batch)):
            for _ in range(20):
                predict_proba(loaded.model, sample, 1024)
            runs = []
            for _ in range(300):
                with Timer() as t:
                    predict_proba(loaded.model, sample, 1024)
                runs.append(t.seconds)
            timings[label] = statistics.median(runs) * 1000
        out[name] = (probs, timings)
        saved = io.BytesIO()
        torch.save(loaded.model.state_dict(), saved)
        report.add(name, len(labels), float((probs.argmax(1) == labels).mean()), timings["1"], timings["32"],
                   f"{saved.tell() / 1024:.0f} KiB")
    p32, p8 = out["fp32"][0], out["int8"][0]
    report.note(f"int8 vs fp32 on the {len(labels)} held-out records: labels agree on "
                f"{(p32.argmax(1) == p8.argmax(1)).mean() * 100:.1f} %, largest probability change "
                f"{np.abs(p32 - p8).max():.4f}, mean {np.abs(p32 - p8).mean():.5f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="demo rows to train on (and to send)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per concurrency level")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()

    config, model, cfg = trained_model(args.n)
    manifest = demo_data(args.n)
    requests = calls(manifest)
    report = Report(f"Serving: `mmpipe serve` ({args.replicas} model replicas) vs the same Predictor in-process",
                    ["where", "clients", "requests", "requests/s", "records predicted/s", "good p50 ms",
                     "good p95 ms", "good p99 ms", "all p50 / p95 / p99 ms", "5xx", "answers by kind and status"])
    row(report, "in-process", 1, in_process(cfg, model, requests, args.seconds))
    proc = start_service(config, model, args.port, args, "none")
    try:
        load(args.port, requests, 4, 3.0)   # warm-up: connections, first batches
        for clients in LEVELS:
            row(report, "mmpipe serve", clients, load(args.port, requests, clients, args.seconds))
    finally:
        stop_service(proc)
    proc = start_service(config, model, args.port, args, "int8")
    try:
        load(args.port, requests, 4, 3.0)
        row(report, "mmpipe serve --quantize int8", 8, load(args.port, requests, 8, args.seconds))
    finally:
        stop_service(proc)
    bad = sum(1 for c in requests if c.kind != "good")
    report.note(f"{len(requests)} distinct requests of one record each ({bad} bad: "
                f"{', '.join(f'{k} {sum(c.kind == k for c in requests)}' for k in ('corrupt', 'bad_json', 'bad_type'))}), "
                f"sent round-robin; {args.seconds:g} s per level after a 3 s warm-up; "
                "latency is the client's, from sending the request to reading the whole answer.")
    report.print()

    q = Report("Dynamic int8 quantisation of the fusion model's Linear layers (CPU, 1 thread)",
               ["model", "held-out records", "accuracy", "forward ms (1 record)", "forward ms (32 records)", "weights"])
    quantisation(cfg, model, manifest, model.parent.parent, q)
    q.print()


if __name__ == "__main__":
    main()
