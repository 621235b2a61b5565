"""Prometheus metrics of one router process, on a registry of its own. The names and labels
are the operations contract (docs/operations.md lists them all); label values stay bounded:
providers, models, routes and categories come from the catalog, never from a request, and a
tenant label only when the operator enables it (`metrics.tenant_labels`).

The per-attempt families are hot: their children are made once per (provider, model) and
kept (`_AttemptSeries`), not looked up by label on every attempt."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from workers.providers.base import Usage

_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STATUSES = ("ok", "error", "timeout", "cancelled")


class _AttemptSeries:
    """The children of one (provider, model): attempts by status, latency, TTFT, tokens and
    cost (without the tenant label)."""

    __slots__ = ("attempts", "cached", "completion", "cost", "latency", "prompt", "ttft")

    def __init__(self, m: RouterMetrics, provider: str, model: str) -> None:
        self.attempts = {s: m.attempts.labels(provider, model, s) for s in _STATUSES}
        self.latency = m.latency.labels(provider, model)
        self.ttft = m.ttft.labels(provider, model)
        if not m.tenant_labels:
            self.prompt = m.tokens.labels(provider, model, "prompt")
            self.completion = m.tokens.labels(provider, model, "completion")
            self.cached = m.tokens.labels(provider, model, "cached_prompt")
            self.cost = m.cost.labels(provider, model)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, *, tenant_labels: bool = False) -> None:
        self.tenant_labels = tenant_labels
        tenant = ["tenant"] if tenant_labels else []
        self.requests = Counter(
            "switchyard_router_requests", "Requests this router handled, by mode and outcome "
            "(ok, error, refused: 4xx before any provider call, expired: past the deadline "
            "before they started, cancelled: the client left)", ["mode", "outcome"],
            registry=registry)
        self.attempts = Counter("switchyard_router_attempts", "Provider attempts, by status "
                                "(ok, error, timeout, cancelled)",
                                ["provider", "model", "status"], registry=registry)
        self.latency = Histogram("switchyard_router_attempt_duration_seconds",
                                 "Provider attempt duration", ["provider", "model"],
                                 buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.ttft = Histogram("switchyard_router_ttft_seconds", "Time to first token (a whole "
                              "answer's time when not streamed)", ["provider", "model"],
                              buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.tokens = Counter(
            "switchyard_router_tokens", "Tokens of provider attempts, by kind: prompt (all "
            "of the prompt), completion, cached_prompt (the part of prompt served from the "
            "provider's cache); estimated when the provider reported none",
            ["provider", "model", "kind", *tenant], registry=registry)
        self.cost = Counter(
            "switchyard_router_cost_usd", "What provider attempts cost, in USD, at catalog "
            "prices", ["provider", "model", *tenant], registry=registry)
        self.failovers = Counter("switchyard_router_failovers", "Attempts started on another "
                                 "route after a route failed", registry=registry)
        self.hedges = Counter("switchyard_router_hedges", "Hedge attempts started: the "
                              "running route was slower than its observed percentile",
                              registry=registry)
        self.races = Counter("switchyard_router_races", "Speculative requests (routes raced),"
                             " by outcome: answered (a route won), failed (none answered)",
                             ["outcome"], registry=registry)
        self.council_stages = Counter(
            "switchyard_router_council_stages", "Council stages run: members (a council "
            "started), quorum_lost, judge, synthesis", ["stage"], registry=registry)
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
        self.breaker_transitions = Counter(
            "switchyard_router_breaker_transitions", "Changes of a route's circuit breaker "
            "this router's outcomes caused, by the state entered (closed, half_open, open)",
            ["route", "to"], registry=registry)
        self.posterior_mean = Gauge(
            "switchyard_bandit_posterior_mean", "The mean of a route's Beta posterior for a "
            "prompt category, as this router last read it", ["route", "category"],
            registry=registry)
        self.draws = Counter(
            "switchyard_bandit_draws", "Thompson draws that put a route first, by category",
            ["route", "category"], registry=registry)
        self.degraded = Counter(
            "switchyard_router_redis_fallbacks", "Routing steps served without Redis (it did "
            "not answer): posteriors or breaker states as last read, outcomes not learnt",
            ["what"], registry=registry)
        self._series: dict[tuple[str, str], _AttemptSeries] = {}
        self._means: dict[tuple[str, str], Gauge] = {}
        self._draws: dict[tuple[str, str], Counter] = {}

    def redis_fallback(self, what: str) -> None:
        self.degraded.labels(what).inc()

    def breaker(self, route: str, before: str | None, state: str) -> None:
        # Every breaker starts closed: a first outcome that opens it is a transition.
        if state != (before or "closed"):
            self.breaker_transitions.labels(route, state).inc()
        self.breaker_state.labels(route).set(_BREAKER_VALUES[state])

    def malformed_event(self, provider: str) -> None:
        self.malformed_events.labels(provider).inc()

    def posterior(self, route: str, category: str, alpha: float, beta: float) -> None:
        """A route's posterior as just read for `category` (its mean, alpha / (alpha+beta))."""
        child = self._means.get((route, category))
        if child is None:
            child = self._means[(route, category)] = self.posterior_mean.labels(route, category)
        child.set(alpha / (alpha + beta) if alpha + beta > 0 else 0.0)

    def drawn(self, route: str, category: str) -> None:
        """A Thompson draw put `route` first for `category`."""
        child = self._draws.get((route, category))
        if child is None:
            child = self._draws[(route, category)] = self.draws.labels(route, category)
        child.inc()

    def attempt(self, provider: str, model: str, status: str, latency_ms: float,
                ttft_ms: float | None, usage: Usage, cost_usd: Decimal, tenant: str) -> None:
        """One attempt's outcome, time, tokens and cost."""
        series = self._series.get((provider, model))
        if series is None:
            series = self._series[(provider, model)] = _AttemptSeries(self, provider, model)
        series.attempts[status].inc()
        series.latency.observe(latency_ms / 1000)
        if ttft_ms is not None:
            series.ttft.observe(ttft_ms / 1000)
        if self.tenant_labels:
            self._tenant_usage(provider, model, usage, cost_usd, tenant)
            return
        if usage.prompt_tokens:
            series.prompt.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            series.completion.inc(usage.completion_tokens)
        if usage.cached_tokens:
            series.cached.inc(usage.cached_tokens)
        if cost_usd:
            series.cost.inc(float(cost_usd))

    def _tenant_usage(self, provider: str, model: str, usage: Usage, cost_usd: Decimal,
                      tenant: str) -> None:
        # Opt-in: a label lookup per attempt, the price of a series per tenant.
        for kind, n in (("prompt", usage.prompt_tokens),
                        ("completion", usage.completion_tokens),
                        ("cached_prompt", usage.cached_tokens)):
            if n:
                self.tokens.labels(provider, model, kind, tenant).inc(n)
        if cost_usd:
            self.cost.labels(provider, model, tenant).inc(float(cost_usd))
