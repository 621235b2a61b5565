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
        self.state_waits = Counter("switchyard_router_state_waits",
                                   "Claims retried because Redis was unreachable",
                                   registry=registry)
        self.skipped = Counter("switchyard_router_skipped", "Redeliveries not executed again",
                               ["reason"], registry=registry)
        self.limit_admissions = Counter(
            "switchyard_router_limit_admissions", "Batch-path (not admitted by an ingress) "
            "rate-limit admissions by outcome (admitted, refused, fail_open, fail_closed)",
            ["outcome"], registry=registry)
        self.limit_refusals = Counter(
            "switchyard_router_limit_refusals", "Batch-path requests refused by a rate "
            "limit, by the limit", ["limit"], registry=registry)
        self.refused = Counter("switchyard_router_refused", "Requests refused before any "
                               "provider call: their key, tenant, role or model (by code)",
                               ["code"], registry=registry)
        self.orphans = Counter(
            "switchyard_router_orphans", "Redeliveries of requests whose worker had died: "
            "billed (it had answered; its bill written now) or lost (died mid-call; "
            "answered worker_lost)", ["outcome"], registry=registry)
        self.cancelled = Counter("switchyard_router_cancelled",
                                 "Attempts cancelled by their client", registry=registry)
        self.malformed_events = Counter(
            "switchyard_router_malformed_stream_events", "Malformed events (a data line that "
            "is not a JSON object) skipped in providers' streams", ["provider"],
            registry=registry)
        self.route_retries = Counter(
            "switchyard_router_route_retries", "Calls made again to the same route after a "
            "transient fault", ["provider", "reason"], registry=registry)
        self.breaker_state = Gauge(
            "switchyard_router_breaker_state", "A route's circuit breaker as this router last "
            "saw it: 0 closed, 1 half-open, 2 open", ["route"], registry=registry)
        self.breaker_opened = Counter(
            "switchyard_router_breaker_opened", "Times this router's outcome opened a route's "
            "circuit breaker", ["route"], registry=registry)

        self.degraded = Counter(
            "switchyard_router_redis_fallbacks", "Routing steps served without Redis (it did "
            "not answer): posteriors or breaker states as last read, outcomes not learnt",
            ["what"], registry=registry)

    def redis_fallback(self, what: str) -> None:
        self.degraded.labels(what).inc()

    def breaker(self, route: str, before: str | None, state: str) -> None:
        if state == "open" and before != "open":
            self.breaker_opened.labels(route).inc()
        self.breaker_state.labels(route).set(_BREAKER_VALUES[state])

    def malformed_event(self, provider: str) -> None:
        self.malformed_events.labels(provider).inc()

    def observe(self, provider: str, status: str, latency_ms: float,
                ttft_ms: float | None) -> None:
        self.attempts.labels(provider, status).inc()
        self.latency.labels(provider).observe(latency_ms / 1000)
        if ttft_ms is not None:
            self.ttft.labels(provider).observe(ttft_ms / 1000)
