"""Per-stage Ray metrics, exported by every node's metrics agent in Prometheus format.

All metrics are declared in ``METRICS`` below (name, kind, description, tags), the way Ray
declares its operator metrics in one place. Ray exports them with a ``ray_`` prefix, and
counters with a ``_total`` suffix: ``mmpipe_rows_in`` is scraped as ``ray_mmpipe_rows_in_total``.
Every series carries ``stage`` (plus ``reason`` for rejects) and Ray's own tags (``WorkerId``,
``NodeAddress``, ``SessionName``); sum over the workers for a stage total.

Counts are at-least-once: a batch that Ray Data retries after an actor died is counted again.
Outside Ray (unit tests calling a stage chain directly) recording is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import ray
from ray.util.metrics import Counter, Gauge, Histogram, Metric

# Batch latency buckets (seconds): sub-millisecond text stages up to minute-long GPU batches.
LATENCY_BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]


@dataclass(frozen=True)
class MetricSpec:
    kind: type[Metric]
    description: str
    tags: tuple[str, ...] = ("stage",)


METRICS: dict[str, MetricSpec] = {
    "mmpipe_rows_in": MetricSpec(Counter, "Rows entering a stage (rejected rows included; they pass through)."),
    "mmpipe_rows_out": MetricSpec(Counter, "Rows leaving a stage (more than in for augment.copies)."),
    "mmpipe_rejects": MetricSpec(Counter, "Rows a stage rejected in this batch, by reason code "
                                          "(under drop_modality: modalities it dropped).", ("stage", "reason")),
    "mmpipe_bytes_in": MetricSpec(Counter, "Media and text bytes a stage read (stages that measure it)."),
    "mmpipe_batch_seconds": MetricSpec(Histogram, "Wall time of one stage over one batch, seconds."),
    "mmpipe_rows_per_second": MetricSpec(Gauge, "Throughput of a stage's last batch on this worker, rows/s."),
}


@lru_cache(maxsize=1)
def _metrics() -> dict[str, Metric]:
    """One instance per metric per process (Ray registers a name once per worker)."""
    made: dict[str, Metric] = {}
    for name, spec in METRICS.items():
        if spec.kind is Histogram:
            made[name] = Histogram(name, spec.description, boundaries=LATENCY_BOUNDARIES, tag_keys=spec.tags)
        else:
            made[name] = spec.kind(name, spec.description, tag_keys=spec.tags)
    return made


class StageMetrics:
    """Records one stage's work on one batch. Cheap: a handful of in-process metric updates that
    Ray's core worker batches and ships to the node's agent in the background."""

    def __init__(self) -> None:
        self.enabled = ray.is_initialized()
        self._m = _metrics() if self.enabled else {}
        self._bytes_seen: dict[str, int] = {}

    def record(self, stage: Any, n_in: int, n_out: int, secs: float, rejected_before: dict[str, int]) -> None:
        """``stage`` is a ``stages.base.Stage``; ``rejected_before`` is a copy of its cumulative
        ``stats.rejected`` taken before the batch, so the difference is this batch's rejects."""
        if not self.enabled:
            return
        tags = {"stage": stage.name}
        m = self._m
        if n_in > 0:
            m["mmpipe_rows_in"].inc(n_in, tags)
        if n_out > 0:
            m["mmpipe_rows_out"].inc(n_out, tags)
        for reason, count in stage.stats.rejected.items():
            delta = count - rejected_before.get(reason, 0)
            if delta > 0:
                m["mmpipe_rejects"].inc(delta, {"stage": stage.name, "reason": reason})
        bytes_in = int(stage.stats.bytes_in)
        delta_bytes = bytes_in - self._bytes_seen.get(stage.name, 0)
        self._bytes_seen[stage.name] = bytes_in
        if delta_bytes > 0:
            m["mmpipe_bytes_in"].inc(delta_bytes, tags)
        m["mmpipe_batch_seconds"].observe(secs, tags)
        if secs > 0:
            m["mmpipe_rows_per_second"].set(n_in / secs, tags)


def prometheus_name(name: str) -> str:
    """The name a metric from ``METRICS`` has on the Prometheus endpoint."""
    suffix = "_total" if METRICS[name].kind is Counter else ""
    return f"ray_{name}{suffix}"
