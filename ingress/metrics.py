"""Prometheus metrics of one ingress process, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("switchyard_ingress_requests", "HTTP requests answered",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("switchyard_ingress_seconds",
                                 "Time to the response head (streams: to the first event)",
                                 ["route"], buckets=_BUCKETS_S, registry=registry)
        self.in_flight = Gauge("switchyard_ingress_in_flight", "Requests being served",
                               registry=registry)
        self.cancels = Counter("switchyard_ingress_cancels", "Cancels sent to the routers",
                               ["reason"], registry=registry)
        self.limit_admissions = Counter(
            "switchyard_limit_admissions", "Rate-limit admissions by outcome (admitted, "
            "refused, fail_open, fail_closed)", ["outcome"], registry=registry)
        self.limit_refusals = Counter(
            "switchyard_limit_refusals", "Requests refused by a rate limit, by the limit",
            ["limit"], registry=registry)
        self.budget_admissions = Counter(
            "switchyard_budget_admissions", "Spend-budget admissions by outcome (reserved, "
            "refused: 402, unchecked: Redis unreachable and served, unavailable: 503)",
            ["outcome"], registry=registry)
