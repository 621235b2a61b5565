"""Prometheus metrics of one ingress process, on a registry of its own. Names and labels are
the operations contract (docs/operations.md lists them); labels stay bounded: routes come
from the route table (`ingress/routes.py` `metric_paths`), modes from `topics/messages.py`."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The `mode` label of a request that is not a model call, or was refused before its body
# named one; a model call that names none is `default` (its tenant policy's, which the
# router resolves).
NO_MODE = "none"
DEFAULT_MODE = "default"


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        """`process`: add prometheus_client's process basics (`process_*`, `python_*`); the
        ingress's own registry has them, tests' throwaway ones need not."""
        self.registry = registry
        if process:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.requests = Counter("switchyard_ingress_requests", "HTTP requests answered, by "
                                "route, status and routing mode", ["route", "status", "mode"],
                                registry=registry)
        self.latency = Histogram("switchyard_ingress_request_duration_seconds",
                                 "Time to the response head (streams: to the first event)",
                                 ["route", "mode"], buckets=_BUCKETS_S, registry=registry)
        self.in_flight = Gauge("switchyard_ingress_in_flight", "Requests being served",
                               registry=registry)
        self.cancels = Counter("switchyard_ingress_cancels", "Cancels sent to the routers",
                               ["reason"], registry=registry)
        self.reply_channel_up = Gauge(
            "switchyard_ingress_reply_channel_up", "1 while this ingress is subscribed to its "
            "reply channel (Redis pub/sub), 0 while not: model calls are refused with 503",
            registry=registry)
        self.reply_channel_losses = Counter(
            "switchyard_ingress_reply_channel_losses", "Times the reply channel's subscription "
            "was lost (the requests waiting on it failed with 503 reply_channel_lost)",
            registry=registry)
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
        # (route, status, mode) → its two children: made once, not per request.
        self._answered: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def answered(self, route: str, status: str, mode: str, seconds: float) -> None:
        """A response head sent (the middleware, `ingress/middleware.py`)."""
        children = self._answered.get((route, status, mode))
        if children is None:
            children = self._answered[(route, status, mode)] = (
                self.requests.labels(route, status, mode), self.latency.labels(route, mode))
        children[0].inc()
        children[1].observe(seconds)

    def watch_reply_channel(self, connected: Callable[[], bool]) -> None:
        """`switchyard_ingress_reply_channel_up` read at each scrape: nothing on the path."""
        self.reply_channel_up.set_function(lambda: 1.0 if connected() else 0.0)
