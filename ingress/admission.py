"""Admission of an inference request before it is queued: every admitter's Redis script in
ONE pipeline, so admission costs one round trip however many checks it runs.

An admitter (`Admitter`) turns a request into a ticket whose script is queued on the shared
pipeline (`queue(pipe)`) and whose result says yes or no (`parse(result)`). The rate limits
(`state/limits.py` `LimitTicket`) are one; spend budgets join the same list. A refusal is
429 `rate_limit_exceeded` with `Retry-After`; the `x-ratelimit-*` headers (and the seed's
`X-RateLimit-*`) go on every response of the route, errors and streams included
(`ingress/middleware.py` adds what admission left in the request's scope).

An admitted request is published with `admitted: true` (`topics/messages.py`), so the
router does not count it again; the router settles its tokens and frees its concurrency
slot when it ends (`workers/router/limits.py`). A request that never reached the queue is
settled here with nothing used.

Redis unreachable (bounded by `redis.socket_timeout_s`): each tenant's `fail_open` (default
`limits.fail_open`) serves the request unlimited, or refuses it with 503
`limits_unavailable`. Policy: `topics/limits.py`; docs/limits.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis

from ingress.metrics import IngressMetrics
from ingress.pipeline import Pipeline, Submission
from ingress.replies import FrameStream
from state import limits as store
from state.limits import LimitStore, LimitTicket
from state.runtime import OUTAGE_RETRY_AFTER_S, outage
from topics.errors import SwitchyardError, Unavailable
from topics.limits import estimate_tokens, refusal
from topics.messages import ReplyFrame

if TYPE_CHECKING:
    from ingress.call import Call  # whose Services hold an Admission

log = logging.getLogger(__name__)

HEADERS_STATE = "response_headers"  # scope["state"] key read by ingress/middleware.py
# Errors of the pipeline after which the request is known not to be queued: its
# reservation is given back at once rather than at its deadline.
_UNQUEUED = frozenset({"reply_channel_unavailable", "request_too_large"})


@dataclass(frozen=True, slots=True)
class Admission:
    redis: redis.Redis
    limits: LimitStore | None  # None: rate limits off (`limits.enabled`)
    metrics: IngressMetrics

    async def submit(self, call: Call, pipeline: Pipeline,
                     job: Submission) -> tuple[ReplyFrame, FrameStream]:
        """Admit `job`, then submit it marked admitted."""
        admitted = await self.admit(call, job)
        try:
            return await pipeline.submit(replace(job, admitted=admitted))
        except SwitchyardError as exc:
            if admitted and exc.code in _UNQUEUED:
                with contextlib.suppress(Exception):
                    await store.settle(self.redis, job.request_id, 0)
            raise

    async def admit(self, call: Call, job: Submission) -> bool:
        """True if the request was counted here (the router must not count it again);
        raises the 429 (or the fail-closed 503)."""
        if self.limits is None:
            return False
        owner = job.owner
        limits = await self.limits.limits(owner.tenant_id, owner.key_id)
        if limits is None or not (limits.tenant.any or limits.key.any):
            return False
        ticket = LimitTicket(
            tenant_id=owner.tenant_id, key_id=owner.key_id, request_id=job.request_id,
            deadline_ms=int((time.time() + job.timeout_s) * 1000),
            tokens=estimate_tokens(job.body), limits=limits)
        try:
            (result,) = await store.run_tickets(self.redis, [ticket])
            verdict = ticket.parse(result)
        except Exception as exc:
            if outage(exc) is None:
                raise
            if limits.fail_open:
                self.metrics.limit_admissions.labels("fail_open").inc()
                log.warning("rate limits not checked for tenant %s (Redis unreachable: %s); "
                            "served (fail-open)", owner.tenant_id, type(exc).__name__)
                return False
            self.metrics.limit_admissions.labels("fail_closed").inc()
            raise Unavailable("rate limits cannot be checked right now (the gateway's "
                              "shared state is unreachable); try again shortly",
                              code="limits_unavailable",
                              retry_after_s=OUTAGE_RETRY_AFTER_S) from exc
        headers = verdict.headers(time.time())
        state: dict[str, Any] = call.request.scope["state"]
        state[HEADERS_STATE] = [(k.encode(), v.encode()) for k, v in headers.items()]
        if not verdict.admitted:
            self.metrics.limit_admissions.labels("refused").inc()
            self.metrics.limit_refusals.labels(verdict.limit or "").inc()
            raise refusal(verdict.limit or "", verdict.retry_after_ms)
        self.metrics.limit_admissions.labels("admitted").inc()
        return True

