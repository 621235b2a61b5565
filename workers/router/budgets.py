"""Spend budgets in the router: the batch path's admission (a request published straight to
Kafka reserves here, refused with the same 402 on its reply topic), settlement of every
request to its real cost once its attempts are known (council, racing and hedging: every
attempt counts, as in the ledger), and the alerts at 75/90/100 % (the audit trail, and the
budget's webhook).

The contract is `topics/budgets.py`; the Redis scripts and the budgets' storage
`state/budgets.py`; the ingress's admission `ingress/budgets.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aiohttp
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter

from state.budgets import Alert, BudgetCache, BudgetLedger, Reservation, arrival
from state.runtime import OUTAGE_RETRY_AFTER_S
from topics import names
from topics.audit import new_event
from topics.budgets import (
    candidate_models,
    exceeded,
    from_nano,
    parallel_attempts,
    to_nano,
    usd_text,
    worst_case_usd,
)
from topics.catalog import Catalog
from topics.errors import Unavailable
from topics.messages import RequestEnvelope, UsageEvent

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 5.0
_ADMISSION_TIMEOUT_S = 1.0
ALERT_ACTOR = "budgets"  # the audit actor of an alert: the gateway itself


class BudgetAlerts:
    """Sends an alert to the audit trail (`budget.alert` on `audit.events`) and to the
    budget's webhook: in the background, bounded, never in a request's way."""

    def __init__(self, producer: AIOKafkaProducer, http: aiohttp.ClientSession,
                 registry: CollectorRegistry) -> None:
        self._producer = producer
        self._http = http
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = Counter("switchyard_budget_alerts", "Budget alerts raised, by the "
                            "threshold crossed (percent of the budget)", ["threshold"],
                            registry=registry)
        self.failed = Counter("switchyard_budget_alert_failures", "Budget alerts not "
                              "delivered, by channel (audit, webhook)", ["channel"],
                              registry=registry)

    def send(self, alert: Alert, request_id: str) -> None:
        task = asyncio.create_task(self._send(alert, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, alert: Alert, request_id: str) -> None:
        b = alert.budget
        details = {"budget": b.name, "key_id": b.key_id, "period": b.period,
                   "level_pct": alert.level_pct, "hard_cap": b.hard,
                   "budget_used_usd": usd_text(from_nano(alert.spent_nano)),
                   "budget_limit_usd": usd_text(b.limit_usd)}
        self.sent.labels(str(alert.level_pct)).inc()
        event = new_event(tenant_id=b.tenant_id, actor=ALERT_ACTOR, action="budget.alert",
                          target=b.name, details=details, request_id=request_id)
        try:
            await asyncio.wait_for(self._producer.send_and_wait(
                names.AUDIT, event.to_json(), key=b.tenant_id.encode(),
                headers=[(names.H_TENANT_ID, b.tenant_id.encode()),
                         (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON)]), WEBHOOK_TIMEOUT_S)
        except Exception as exc:  # the alert is lost, never the request
            self.failed.labels("audit").inc()
            log.warning("budget alert %s for %s not audited: %r", b.name, b.tenant_id, exc)
        if b.webhook_url is None:
            return
        try:
            async with self._http.post(
                    b.webhook_url, json={"type": "budget.alert", "tenant_id": b.tenant_id,
                                         **details},
                    timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)) as response:
                if response.status >= 300:
                    raise RuntimeError(f"HTTP {response.status}")
        except Exception as exc:
            self.failed.labels("webhook").inc()
            log.warning("budget alert webhook for %s failed: %r", b.tenant_id, exc)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RouterBudgets:
    def __init__(self, cache: BudgetCache, ledger: BudgetLedger, catalog: Catalog,
                 mode_routes: dict[str, int], bill: Callable[[str], Sequence[UsageEvent]],
                 alerts: BudgetAlerts) -> None:
        self._cache = cache
        self._ledger = ledger
        self._catalog = catalog
        self._mode_routes = mode_routes
        self._bill = bill
        self._alerts = alerts

    async def admit(self, env: RequestEnvelope) -> None:
        """The batch path: reserve the worst case as the ingress would, or raise the same 402
        (or 503 `budgets_unavailable` when Redis cannot say and a hard budget fails closed).
        A request the ingress admitted is not checked again: `admitted` is trusted only with
        its reservation behind it (a batch producer can set the field, not make that)."""
        if env.admitted:
            budgets = await self._cache.budgets(env.tenant_id, env.key_id)
            if not budgets or await self._ledger.reserved(env.tenant_id, env.request_id):
                return
        # Read now, not from the cache: a budget set a moment ago holds here at once.
        budgets = await self._cache.fresh(env.tenant_id, env.key_id)
        if not budgets:
            return
        kind = "embedding" if env.endpoint == "embeddings" else "chat"
        routing = env.routing.model_dump(exclude_none=True)
        amount = worst_case_usd(env.body, candidate_models(self._catalog, env.body, kind),
                                parallel_attempts(routing, self._mode_routes))
        at = arrival(env.received_at_ms)
        r = Reservation(tenant_id=env.tenant_id, request_id=env.request_id,
                        deadline_ms=env.deadline_ms + 5_000, amount_nano=to_nano(amount),
                        budgets=budgets, at=at)
        try:
            async with asyncio.timeout(_ADMISSION_TIMEOUT_S):
                outcome = await self._ledger.reserve(r)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            if all(b.fail_open or not b.hard for b in budgets):
                return
            raise Unavailable("spend budgets cannot be checked right now; try again shortly",
                              code="budgets_unavailable",
                              retry_after_s=OUTAGE_RETRY_AFTER_S) from exc
        if outcome.kind == "over" and outcome.budget is not None:
            raise exceeded(outcome.budget, outcome.used_nano, datetime.now(UTC))

    async def settle(self, env: RequestEnvelope) -> None:
        """The request's real cost (every attempt) replaces its reservation, once. Never
        raises: a failure leaves the reservation to expire at its deadline, and the spend in
        the ledger (counted again when the counter is next seeded)."""
        try:
            # The reservation names the budgets it was made in; these (perhaps a moment
            # stale) are for a request without one, and for the alerts.
            budgets = await self._cache.budgets(env.tenant_id, env.key_id)
            cost = sum((e.cost_usd for e in self._bill(env.request_id)), start=from_nano(0))
            at = arrival(env.received_at_ms)
            settled = await self._ledger.settle(env.tenant_id, env.request_id, budgets, at,
                                                to_nano(cost))
        except Exception as exc:
            log.warning("request %s: budgets not settled: %r", env.request_id, exc)
            return
        for alert in settled.alerts:
            self._alerts.send(alert, env.request_id)
        if not settled.stale:
            return
        # The ingress reserved in a budget this router's cache does not hold yet (set a
        # moment ago): its alerts are due now, not at the first settlement after the cache
        # expires (with its hard cap reached, there may be none).
        try:
            budgets = await self._cache.fresh(env.tenant_id, env.key_id)
            for alert in await self._ledger.alerts(budgets, at):
                self._alerts.send(alert, env.request_id)
        except Exception as exc:
            log.warning("request %s: budget alerts not checked: %r", env.request_id, exc)
