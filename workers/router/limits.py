"""The router's side of the rate limits (`topics/limits.py`, `state/limits.py`).

- The batch path: a request published straight to `llm.requests` was admitted by no ingress
  (`RequestEnvelope.admitted` is false, or true without the admission's reservation in
  Redis: the field alone proves nothing); the router admits it with the same script, after
  its key check, and refuses it with the same 429 `rate_limit_exceeded` on its reply
  target. So Kafka is no way around the limits.
- Settlement: when a request ends (`settled`, after its usage events are durable), its token
  reservation is settled to the tokens every attempt really used (council, racing and
  hedging count each attempt, as the ledger does) and its concurrency slot is freed. Keyed by
  the request id, applied once: a redelivered copy settles nothing more.

Redis unreachable: the tenant's `fail_open` as at the ingress; a settlement that fails is
logged and its reservation left to expire at the request's deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis.asyncio as redis

from state import limits as store
from state.limits import LimitStore, LimitTicket
from state.runtime import OUTAGE_RETRY_AFTER_S, outage
from topics.errors import Unavailable
from topics.limits import estimate_tokens, refusal
from topics.messages import RequestEnvelope, UsageEvent
from workers.router.metrics import RouterMetrics

log = logging.getLogger(__name__)


class RouterLimits:
    def __init__(self, client: redis.Redis, limits: LimitStore,
                 metrics: RouterMetrics) -> None:
        self._redis = client
        self._limits = limits
        self._metrics = metrics

    async def admit(self, env: RequestEnvelope) -> None:
        """Admit a request no ingress admitted; raises its 429 (or fail-closed 503)."""
        limits = await self._limits.limits(env.tenant_id, env.key_id)
        if limits is None or not (limits.tenant.any or limits.key.any):
            return
        # `admitted` is trusted only with the admission's reservation behind it: a batch
        # producer could set the field, not make the reservation.
        if env.admitted and await self._admitted(env.request_id, limits.fail_open):
            return
        ticket = LimitTicket(tenant_id=env.tenant_id, key_id=env.key_id,
                             request_id=env.request_id, deadline_ms=env.deadline_ms,
                             tokens=estimate_tokens(env.body), limits=limits)
        try:
            (result,) = await store.run_tickets(self._redis, [ticket])
            verdict = ticket.parse(result)
        except Exception as exc:
            if outage(exc) is None:
                raise
            if limits.fail_open:
                self._metrics.limit_admissions.labels("fail_open").inc()
                log.warning("rate limits not checked for %s (Redis unreachable); served",
                            env.request_id)
                return
            self._metrics.limit_admissions.labels("fail_closed").inc()
            raise Unavailable("rate limits cannot be checked right now; try again shortly",
                              code="limits_unavailable",
                              retry_after_s=OUTAGE_RETRY_AFTER_S) from exc
        if not verdict.admitted:
            self._metrics.limit_admissions.labels("refused").inc()
            self._metrics.limit_refusals.labels(verdict.limit or "").inc()
            raise refusal(verdict.limit or "", verdict.retry_after_ms)
        self._metrics.limit_admissions.labels("admitted").inc()

    async def _admitted(self, request_id: str, fail_open: bool) -> bool:
        try:
            return await store.was_admitted(self._redis, request_id)
        except Exception as exc:
            if outage(exc) is None:
                raise
            return fail_open  # admit() then applies the tenant's fail-safe if it is closed

    async def settle(self, request_id: str, events: Sequence[UsageEvent]) -> None:
        used = sum(event.prompt_tokens + event.completion_tokens for event in events)
        try:
            await store.settle(self._redis, request_id, used)
        except Exception as exc:
            if outage(exc) is None:
                raise
            log.warning("rate-limit reservation of %s not settled (Redis unreachable); it "
                        "expires at the request's deadline", request_id)
