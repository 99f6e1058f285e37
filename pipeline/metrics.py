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

import ray
from ray.util.metrics import Counter, Gauge, Histogram, Metric

from stages.base import StageStats

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
    "mmpipe_batch_seconds": MetricSpec(Histogram, "Wall time of one stage over one block, seconds."),
    "mmpipe_rows_per_second": MetricSpec(Gauge, "Throughput of a stage's last block on this worker, rows/s."),
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

    def record(self, stats: StageStats) -> None:
        """One stage's work on one block (the record that also goes into the run record)."""
        if not self.enabled:
            return
        tags = {"stage": stats.stage}
        m = self._m
        if stats.rows_in > 0:
            m["mmpipe_rows_in"].inc(stats.rows_in, tags)
        if stats.rows_out > 0:
            m["mmpipe_rows_out"].inc(stats.rows_out, tags)
        for reason, count in stats.rejected.items():
            if count > 0:
                m["mmpipe_rejects"].inc(count, {"stage": stats.stage, "reason": reason})
        if stats.bytes_in > 0:
            m["mmpipe_bytes_in"].inc(stats.bytes_in, tags)
        m["mmpipe_batch_seconds"].observe(stats.seconds, tags)
        if stats.seconds > 0:
            m["mmpipe_rows_per_second"].set(stats.rows_in / stats.seconds, tags)


def prometheus_name(name: str) -> str:
    """The name a metric from ``METRICS`` has on the Prometheus endpoint."""
    suffix = "_total" if METRICS[name].kind is Counter else ""
    return f"ray_{name}{suffix}"
