"""Prometheus metrics of the audit writer (`workers/audit/main.py`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.offered = Counter(
            "switchyard_audit_events", "Audit events offered to the chains, by outcome "
            "(written; duplicate: a redelivery)", ["outcome"], registry=registry)
        self.append_duration = Histogram(
            "switchyard_audit_append_duration_seconds", "One chain append",
            registry=registry)
