"""Admission of an inference request before it is queued: every admitter's Redis script in
ONE pipeline, so admission costs one round trip however many checks it runs.

An admitter (`Admitter`) turns a request into a ticket whose script is queued on the shared
pipeline (`queue(pipe)`) and whose result says yes or no (`parse(result)`). The rate limits
(`state/limits.py` `LimitTicket`) are one, the spend budgets' reservation
(`state/budgets.py` `BudgetTicket`, from `ingress/budgets.py`) the other. A rate limit's
refusal is 429 `rate_limit_exceeded` with `Retry-After`, a hard budget's 402
`budget_exceeded`; when one refuses, what the other took is given back (a round trip on the
refusal only). The `x-ratelimit-*` headers (and the seed's
`X-RateLimit-*`) go on every response of the route, errors and streams included
(`ingress/middleware.py` adds what admission left in the request's scope).

An admitted request is published with `admitted: true` (`topics/messages.py`), so the
router does not count it again; the router settles its tokens and frees its concurrency
slot when it ends (`workers/router/limits.py`). A request that never reached the queue is
settled here with nothing used.

Redis unreachable (bounded by `redis.socket_timeout_s`): each tenant's `fail_open` (default
`limits.fail_open`) serves the request unlimited, or refuses it with 503
`limits_unavailable`; a hard budget fails closed unless it says `fail_open` (503
`budgets_unavailable`). Policy: `topics/limits.py`, `topics/budgets.py`; docs/limits.md,
docs/budgets.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as redis

from ingress.metrics import DEFAULT_MODE, NO_MODE, IngressMetrics
from ingress.pipeline import Pipeline, Submission
from ingress.replies import FrameStream
from state import limits as store
from state.budgets import BudgetCache, BudgetLedger, BudgetTicket, Reservation, arrival
from state.limits import LimitStore, LimitTicket
from state.runtime import OUTAGE_RETRY_AFTER_S, outage
from topics.budgets import (
    candidate_models,
    exceeded,
    parallel_attempts,
    to_nano,
    worst_case_usd,
)
from topics.catalog import Catalog
from topics.errors import SwitchyardError, Unavailable
from topics.identity import Principal
from topics.limits import Limits, estimate_tokens, refusal
from topics.messages import MODES, ReplyFrame

if TYPE_CHECKING:
    from ingress.call import Call  # whose Services hold an Admission

log = logging.getLogger(__name__)

HEADERS_STATE = "response_headers"  # scope["state"] key read by ingress/middleware.py
# Errors of the pipeline after which the request is known not to be queued: its
# reservation is given back at once rather than at its deadline.
_UNQUEUED = frozenset({"reply_channel_unavailable", "request_too_large"})
# Bounded: a mode the request names is one of these (it is validated before it is queued).
_MODE_LABELS = frozenset((*MODES, DEFAULT_MODE))


class BudgetAdmission:
    """Reserves each request's worst-case cost against its tenant's and key's budgets."""

    def __init__(self, cache: BudgetCache, ledger: BudgetLedger, catalog: Catalog,
                 mode_routes: dict[str, int]) -> None:
        self.cache = cache
        self.ledger = ledger
        self._catalog = catalog
        self._mode_routes = mode_routes  # each mode's default routes (router settings)

    async def reservation(self, owner: Principal, request_id: str, body: dict[str, Any],
                          routing: dict[str, Any], kind: Literal["chat", "embedding"],
                          timeout_s: float) -> Reservation | None:
        """What the request reserves; None when no budget applies (no Redis call at all)."""
        budgets = await self.cache.budgets(owner.tenant_id, owner.key_id)
        if not budgets:
            return None
        amount = worst_case_usd(body, candidate_models(self._catalog, body, kind),
                                parallel_attempts(routing, self._mode_routes))
        now_ms = int(time.time() * 1000)
        return Reservation(tenant_id=owner.tenant_id, request_id=request_id,
                           # Past its deadline (and the ingress's slack) the request is dead
                           # or answered: its reservation may go.
                           deadline_ms=now_ms + int((timeout_s + 5) * 1000),
                           amount_nano=to_nano(amount), budgets=budgets, at=arrival(now_ms))


@dataclass(frozen=True, slots=True)
class Admission:
    redis: redis.Redis
    limits: LimitStore | None  # None: rate limits off (`limits.enabled`)
    metrics: IngressMetrics
    budgets: BudgetAdmission | None = None  # None: no spend budgets checked

    async def submit(self, call: Call, pipeline: Pipeline,
                     job: Submission) -> tuple[ReplyFrame, FrameStream]:
        """Admit `job`, then submit it marked admitted."""
        # The request's metrics label (`ingress/middleware.py`), whatever becomes of it.
        mode = job.routing.get("mode") or DEFAULT_MODE
        call.request.scope["state"]["mode"] = mode if mode in _MODE_LABELS else NO_MODE
        admitted = await self.admit(call, job)
        try:
            return await pipeline.submit(replace(job, admitted=admitted))
        except SwitchyardError as exc:
            if admitted and exc.code in _UNQUEUED:
                with contextlib.suppress(Exception):
                    await store.settle(self.redis, job.request_id, 0)
            raise

    async def admit_cached(self, call: Call, job: Submission) -> None:
        """A response-cache hit (`ingress/response_cache.py`): a request to the rate limits,
        reserving no tokens (no provider is called), its concurrency slot freed at once;
        no spend reserved (it costs 0). Raises the 429 (or a fail-closed 503)."""
        await self.admit(call, job, cached=True)

    async def admit(self, call: Call, job: Submission, *, cached: bool = False) -> bool:
        """True if admission ran here, whatever applied was counted (the router must not
        count it again, nor look for budgets again: without this mark it reads the tenant's
        budgets from the database for the request, as for the batch path); False only when
        Redis could not be asked. Raises the 429 or 402 (or a fail-closed 503)."""
        limits = await self._limits(job)
        reservation = None if cached else await self._reservation(job)
        if limits is None and reservation is None:
            return True  # nothing to count: checked all the same
        owner = job.owner
        ticket = None if limits is None else LimitTicket(
            tenant_id=owner.tenant_id, key_id=owner.key_id, request_id=job.request_id,
            deadline_ms=int((time.time() + job.timeout_s) * 1000),
            tokens=0 if cached else estimate_tokens(job.body), limits=limits)
        budget = None if reservation is None or self.budgets is None \
            else BudgetTicket(self.budgets.ledger, reservation)
        try:
            results = await store.run_tickets(self.redis, [t for t in (ticket, budget) if t])
            verdict = None if ticket is None else ticket.parse(results[0])
            outcome = None if budget is None else budget.parse(results[-1])
            if budget is not None and outcome is not None and outcome.kind != "ok" \
                    and outcome.kind != "over":
                # Counters to seed from the ledger (their first use in a period): more round
                # trips, this once.
                outcome = await budget.ledger.reserve(budget.reservation)
        except Exception as exc:
            if outage(exc) is None:
                raise
            self._unchecked(owner.tenant_id, limits, reservation, exc)
            return False
        if verdict is not None:
            headers = verdict.headers(time.time())
            state: dict[str, Any] = call.request.scope["state"]
            state[HEADERS_STATE] = [(k.encode(), v.encode()) for k, v in headers.items()]
        if verdict is not None and not verdict.admitted:
            self.metrics.limit_admissions.labels("refused").inc()
            self.metrics.limit_refusals.labels(verdict.limit or "").inc()
            if outcome is not None and outcome.kind == "ok":
                await self._release_budget(reservation)
            raise refusal(verdict.limit or "", verdict.retry_after_ms)
        if outcome is not None and outcome.kind == "over" and outcome.budget is not None:
            assert reservation is not None
            self.metrics.budget_admissions.labels("refused").inc()
            if verdict is not None:
                with contextlib.suppress(Exception):
                    await store.settle(self.redis, job.request_id, 0)
            raise exceeded(outcome.budget, outcome.used_nano, reservation.at)
        if verdict is not None:
            self.metrics.limit_admissions.labels("admitted").inc()
            if cached:  # answered at once: nothing to hold its slot for
                with contextlib.suppress(Exception):
                    await store.settle(self.redis, job.request_id, 0)
        if outcome is not None:
            self.metrics.budget_admissions.labels("reserved").inc()
        return True

    async def _limits(self, job: Submission) -> Limits | None:
        if self.limits is None:
            return None
        limits = await self.limits.limits(job.owner.tenant_id, job.owner.key_id)
        return limits if limits is not None and (limits.tenant.any or limits.key.any) else None

    async def _reservation(self, job: Submission) -> Reservation | None:
        if self.budgets is None:
            return None
        return await self.budgets.reservation(
            job.owner, job.request_id, job.body, job.routing,
            "chat" if job.endpoint == "chat.completions" else "embedding", job.timeout_s)

    def _unchecked(self, tenant_id: str, limits: Limits | None,
                   reservation: Reservation | None, exc: BaseException) -> None:
        """Redis cannot say: serve unchecked where the policies allow it, else the 503."""
        if limits is not None:
            if not limits.fail_open:
                self.metrics.limit_admissions.labels("fail_closed").inc()
                raise Unavailable("rate limits cannot be checked right now (the gateway's "
                                  "shared state is unreachable); try again shortly",
                                  code="limits_unavailable",
                                  retry_after_s=OUTAGE_RETRY_AFTER_S) from exc
            self.metrics.limit_admissions.labels("fail_open").inc()
        if reservation is not None and not all(b.fail_open or not b.hard
                                               for b in reservation.budgets):
            self.metrics.budget_admissions.labels("unavailable").inc()
            raise Unavailable("spend budgets cannot be checked right now; try again shortly",
                              code="budgets_unavailable",
                              retry_after_s=OUTAGE_RETRY_AFTER_S) from exc
        if reservation is not None:
            self.metrics.budget_admissions.labels("unchecked").inc()
        log.warning("admission not checked for tenant %s (Redis unreachable: %s); served "
                    "(fail-open)", tenant_id, type(exc).__name__)

    async def _release_budget(self, reservation: Reservation | None) -> None:
        if reservation is None or self.budgets is None:
            return
        with contextlib.suppress(Exception):
            await self.budgets.ledger.settle(reservation.tenant_id, reservation.request_id,
                                             reservation.budgets, reservation.at, 0)
