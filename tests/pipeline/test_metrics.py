"""Per-stage Ray metrics: a real run on an in-process Ray with a Prometheus export port, then the
scraped counters must add up to the run record's counts."""
from __future__ import annotations

import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import ray
import yaml
from deltalake import DeltaTable
from prometheus_client.parser import text_string_to_metric_families

from core.config import load_config
from pipeline.demo import make_demo
from pipeline.metrics import METRICS, StageMetrics, prometheus_name
from pipeline.runner import run
from stages.base import Stage, StageStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(folder: Path, manifest: Path, store: Path, port: int):
    data = {
        "ray": {"dashboard": False, "progress_bars": False, "num_cpus": 2, "metrics_export_port": port},
        "execution": {"batch_size": 8, "concurrency": 1, "local_max_rows": 0},   # the stages in Ray actors
        "stages": {"cleanup": {"image": {"params": {"blur_threshold": 5.0}}},
                   "features": {"image": {"encoder": "hist"}, "text": {"encoder": "hashed"},
                                "audio": {"encoder": "logmel"}}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, values={"source.path": str(manifest), "store": str(store)})


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> samples, from the node's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        families.setdefault(fam.name, []).extend(fam.samples)
    return families


def totals(families: dict[str, list], metric: str, by: tuple[str, ...] = ("stage",)) -> Counter:
    """Sum of a counter's samples over Ray's per-worker series, keyed by the given tags."""
    exported = prometheus_name(metric)
    out: Counter = Counter()
    for sample in families.get(exported.removesuffix("_total"), []):
        if sample.name == exported:
            out[tuple(sample.labels[k] for k in by)] += sample.value
    return out


def stage_rejects(store: Path) -> Counter:
    """Rejects by reason that a stage of the processing pass made (the planner's own exact-duplicate
    and repeated-id rejects never pass through a stage, and the scan runs in the driver, which
    exports no metrics)."""
    rows = DeltaTable(str(store / "rejects")).to_pyarrow_table(columns=["stage", "reason"]).to_pylist()
    return Counter(r["reason"] for r in rows
                   if not (r["stage"] == "ingest" and r["reason"] in PLANNER_REASONS) and r["stage"] != "ingest.scan")


PLANNER_REASONS = {"duplicate", "duplicate_id"}


class Upper(Stage):
    name = "test.upper"


def test_stage_metrics_is_a_noop_outside_ray():
    assert not ray.is_initialized()
    m = StageMetrics()
    assert not m.enabled
    m.record(StageStats(Upper.name, rows_in=4, rows_out=4, seconds=0.01, rejected={"x": 1}))   # must not raise nor start Ray
    assert not ray.is_initialized()


def test_metrics_are_declared_with_descriptions():
    for name, spec in METRICS.items():
        assert name.startswith("mmpipe_") and spec.description and "stage" in spec.tags


@pytest.mark.slow
def test_scraped_stage_counters_match_the_run_record(tmp_path):
    port = free_port()
    manifest = make_demo(tmp_path / "data", n=12)
    cfg = tiny_config(tmp_path, manifest, tmp_path / "store", port)
    try:
        record = run(cfg, log=lambda s: None).record
        # the scan (ingest.scan) runs in the driver before the pass: only the pass's actors export
        expected_rows = {(name,): s["rows"] for name, s in record["stages"].items() if name != "ingest.scan"}
        expected_rejects = stage_rejects(tmp_path / "store")
        # The core workers ship metrics to the agent every few seconds: poll, bounded.
        deadline = time.monotonic() + 90
        while True:
            families = scrape(port)
            rows_in = totals(families, "mmpipe_rows_in")
            if dict(rows_in) == expected_rows or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        ray.shutdown()
    assert dict(rows_in) == expected_rows
    assert totals(families, "mmpipe_rows_out")[("cleanup.image",)] == expected_rows[("cleanup.image",)]
    rejects = totals(families, "mmpipe_rejects", ("stage", "reason"))
    by_reason: Counter = Counter()
    for (_, reason), n in rejects.items():
        by_reason[reason] += n
    assert by_reason == expected_rejects
    assert totals(families, "mmpipe_bytes_in")[("cleanup.image",)] > 0
    latency = [s for s in families["ray_mmpipe_batch_seconds"]
               if s.name == "ray_mmpipe_batch_seconds_count" and s.labels["stage"] == "features.text"]
    assert sum(s.value for s in latency) >= 1


def test_the_grafana_dashboard_shows_every_metric_and_only_exported_ones():
    """configs/grafana/mmpipe-dashboard.json: valid JSON, each query names only metrics that
    pipeline/metrics.py declares (as Ray exports them: ray_ prefix, _total for counters, the
    histogram's _bucket / _sum / _count), and every declared metric has a panel."""
    import json
    import re
    from pathlib import Path

    from ray.util.metrics import Counter, Histogram

    dash = json.loads((Path(__file__).resolve().parents[2] / "configs" / "grafana" / "mmpipe-dashboard.json").read_text())
    exported = set()
    for name, spec in METRICS.items():
        if spec.kind is Counter:
            exported.add(f"ray_{name}_total")
        elif spec.kind is Histogram:
            exported |= {f"ray_{name}_{s}" for s in ("bucket", "sum", "count")}
        else:
            exported.add(f"ray_{name}")
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {m for q in queries for m in re.findall(r"\b(ray_[a-z_]+)\b", q)}
    assert used and used <= exported, used - exported
    for name in METRICS:
        assert any(m.startswith(f"ray_{name}") for m in used), name
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
