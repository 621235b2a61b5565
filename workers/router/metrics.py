"""Prometheus metrics of one router process, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter("switchyard_router_attempts", "Provider attempts",
                                ["provider", "status"], registry=registry)
        self.latency = Histogram("switchyard_router_attempt_seconds",
                                 "Provider attempt duration", ["provider"],
                                 buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.ttft = Histogram("switchyard_router_ttft_seconds", "Time to first token",
                              ["provider"], buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.expired = Counter("switchyard_router_expired", "Requests past their deadline "
                               "before they started", registry=registry)
        self.skipped = Counter("switchyard_router_skipped", "Redeliveries not executed again",
                               ["reason"], registry=registry)
        self.cancelled = Counter("switchyard_router_cancelled",
                                 "Attempts cancelled by their client", registry=registry)
        self.breaker_state = Gauge(
            "switchyard_router_breaker_state", "A route's circuit breaker as this router last "
            "saw it: 0 closed, 1 half-open, 2 open", ["route"], registry=registry)
        self.breaker_opened = Counter(
            "switchyard_router_breaker_opened", "Times this router's outcome opened a route's "
            "circuit breaker", ["route"], registry=registry)

    def breaker(self, route: str, before: str | None, state: str) -> None:
        if state == "open" and before != "open":
            self.breaker_opened.labels(route).inc()
        self.breaker_state.labels(route).set(_BREAKER_VALUES[state])

    def observe(self, provider: str, status: str, latency_ms: float,
                ttft_ms: float | None) -> None:
        self.attempts.labels(provider, status).inc()
        self.latency.labels(provider).observe(latency_ms / 1000)
        if ttft_ms is not None:
            self.ttft.labels(provider).observe(ttft_ms / 1000)
