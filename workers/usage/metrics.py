"""Prometheus metrics of the usage worker: what it writes to the ledger, in what batches, how
late (`workers/usage/main.py`, `workers/usage/batcher.py`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from topics.messages import UsageEvent

_BATCH_ROWS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
# From an attempt's end to its row committed: the fetch wait and the batch linger, usually.
_LAG_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_WRITE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "switchyard_usage_batch_size", "Usage events in one ledger transaction",
            buckets=_BATCH_ROWS, registry=registry)
        self.write_lag = Histogram(
            "switchyard_usage_write_lag_seconds", "From an attempt's end (the usage event's "
            "`finished_at_ms`) to its ledger write committed", buckets=_LAG_BUCKETS_S,
            registry=registry)
        self.write_duration = Histogram(
            "switchyard_usage_write_duration_seconds", "One ledger transaction",
            buckets=_WRITE_BUCKETS_S, registry=registry)
        rows = Counter(
            "switchyard_usage_rows_total", "Usage events by outcome: written (a committed "
            "ledger transaction held it; a redelivered event is kept once by the ledger), "
            "retried (in a write that failed and is tried again), failed (in a write that "
            "failed for good: dead-lettered)", ["outcome"], registry=registry)
        self.written = rows.labels("written")
        self.retried = rows.labels("retried")
        self.failed = rows.labels("failed")

    def committed(self, events: Sequence[UsageEvent]) -> None:
        now_ms = time.time() * 1000
        self.batch_size.observe(len(events))
        self.written.inc(len(events))
        for event in events:
            self.write_lag.observe(max(now_ms - event.finished_at_ms, 0) / 1000)
