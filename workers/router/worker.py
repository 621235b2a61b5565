"""What the router does with one request: check its deadline, claim it (`state/claims.py`),
re-check its key and tenant (`workers/router/access.py`), label it (when this router
classifies), decide its routes and mode, and hand it to the executor (auto, fixed,
speculative, hedged) or the council.

The key is checked right after the claim, not before: a copy of a request that another
router is running (a redelivery) is skipped by the claim instead of being answered with a
refusal the client would read beside the real answer; and a refusal, like an answer, is
given once. The check costs no round trip while the key is cached.

A redelivered request whose worker died is orphaned. If its claim carries a bill, the dead
worker's answer reached the client (the last frame and the bill are one Redis write,
`workers/router/frames.py`) and only its usage events may be missing: they are produced
again, the same events (the ledger keeps one row per event id), and the client hears
nothing more. Without a bill the worker died mid-call: the client is told `worker_lost`,
and the call is not run again (the provider may already have billed it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from state.claims import Claim, ClaimResult, Claims
from state.runtime import outage
from topics.errors import GatewayTimeout, SwitchyardError, Unavailable, UpstreamError
from topics.messages import RequestEnvelope, UsageEvent
from topics.tracing import Tracing
from workers.classifier.stage import needs_label
from workers.router.access import AccessCheck
from workers.router.attempt import now_ms
from workers.router.budgets import RouterBudgets
from workers.router.cancel import CancelListener
from workers.router.council import Council
from workers.router.decide import Decider
from workers.router.execute import Executor
from workers.router.frames import FrameWriter
from workers.router.limits import RouterLimits
from workers.router.metrics import RouterMetrics
from workers.router.preview import Previewer

log = logging.getLogger(__name__)


class RouterWorker:
    def __init__(self, *, decider: Decider, executor: Executor, council: Council,
                 claims: Claims, access: AccessCheck,
                 frames: Callable[[RequestEnvelope], FrameWriter],
                 cancels: CancelListener, metrics: RouterMetrics,
                 settled: Callable[[str], Awaitable[None]],
                 rebill: Callable[[Sequence[UsageEvent]], Awaitable[None]],
                 label: Callable[[RequestEnvelope], Awaitable[RequestEnvelope]] | None = None,
                 limits: RouterLimits | None = None,
                 budgets: RouterBudgets | None = None,
                 tracing: Tracing | None = None,
                 preview: Previewer | None = None,
                 ) -> None:
        self._decider = decider
        self._executor = executor
        self._council = council
        self._claims = claims
        self._access = access
        self._frames = frames
        self._cancels = cancels
        self._metrics = metrics
        self._settled = settled  # the attempts' bookkeeping, written after the answer
        self._rebill = rebill  # a dead worker's bill to llm.usage
        self._label = label  # set when this router classifies the requests it reads
        self._limits = limits  # the batch path's rate limits; None: off
        self._budgets = budgets  # spend budgets: the batch path's admission, settlement
        self._tracing = tracing or Tracing()
        self._preview = preview  # POST /v1/routing/preview (`workers/router/preview.py`)

    async def handle(self, env: RequestEnvelope, record: Any) -> None:
        # The request's trace, from its traceparent header: every span below is under it
        # (decision, attempts, reply, usage produce); off, its ids still reach the logs.
        with self._tracing.consume(f"{record.topic} process", record,
                                   request_id=env.request_id, attributes={
                                       "switchyard.request_id": env.request_id,
                                       "switchyard.tenant_id": env.tenant_id}):
            await self._traced(env)

    async def _traced(self, env: RequestEnvelope) -> None:
        out = self._frames(env)
        try:
            await self._handle(env, out)
        except Exception as exc:
            down = exc if isinstance(exc, Unavailable) else outage(exc)
            if down is not None:
                # Our infrastructure (Redis, PostgreSQL) is down: a clear 503 with
                # Retry-After; the message itself is fine, nothing to dead-letter.
                log.warning("request %s: %s", env.request_id, down.message)
                with contextlib.suppress(Exception):
                    await out.error(down)
                return
            # Unexpected (a bug, or Kafka failing): the consumer loop dead-letters the
            # request; the client must hear that it failed rather than wait for its deadline.
            with contextlib.suppress(Exception):
                await out.error(SwitchyardError("the router failed on this request",
                                                code="router_failed"))
            raise

    async def _claim(self, env: RequestEnvelope) -> Claim:
        """The claim, waiting out a Redis outage (backing off up to 1 s) while the request's
        deadline allows: a request that arrives while Redis restarts runs once it is back."""
        delay_s = 0.05
        while True:
            try:
                return await self._claims.claim(env.request_id)
            except Unavailable:
                if now_ms() + delay_s * 1000 >= env.deadline_ms:
                    raise
                self._metrics.state_waits.inc()
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)

    async def _handle(self, env: RequestEnvelope, out: FrameWriter) -> None:
        if now_ms() >= env.deadline_ms:
            self._metrics.expired.inc()
            self._counted(env.routing.mode, "expired")
            await out.error(GatewayTimeout("the request waited past its deadline and was not "
                                           "executed", code="deadline_exceeded"))
            return
        # The prompt is labelled while the claim's round trip is in flight; a request that is
        # not ours after all has only cost a classification.
        labelling = (asyncio.ensure_future(self._label(env))
                     if self._label is not None and needs_label(env) else None)
        try:
            claim = await self._claim(env)
        except BaseException:
            _discard(labelling)
            raise
        if claim.result is not ClaimResult.CLAIMED:
            _discard(labelling)
        if claim.result is ClaimResult.ORPHANED:
            await self._orphaned(env, claim, out)
            return
        if claim.result is not ClaimResult.CLAIMED:
            self._metrics.skipped.labels(claim.result.value).inc()
            return
        interrupted = False
        try:
            try:
                caller = await self._access.check(env)
                # A preview calls no provider: nothing to count against limits or budgets.
                previewing = env.routing.preview and self._preview is not None
                if self._limits is not None and not previewing:
                    await self._limits.admit(env)  # the batch path (workers/router/limits.py)
                if self._budgets is not None and not previewing:
                    await self._budgets.admit(env)  # the batch path: same 402 as the ingress
                if labelling is not None:
                    env = await labelling
                if previewing and self._preview is not None:
                    # Everything a real request runs up to the provider call, then the
                    # decision itself is the answer.
                    await out.send("done", {"preview": await self._preview.explain(
                        env, caller.allowed_models)})
                    return
                decision = await self._decider.decide(env, caller.allowed_models)
            except SwitchyardError as exc:
                _discard(labelling)
                if exc.status in (401, 403, 429):
                    self._metrics.refused.labels(exc.code).inc()
                self._counted(env.routing.mode, "refused" if exc.status < 500 else "error")
                await out.error(exc)
                return
            except BaseException:
                _discard(labelling)
                raise
            mode = self._council if decision.mode == "council" else self._executor
            work = asyncio.create_task(mode.run(env, decision, out))
            # A client that leaves cancels this task, and with it every attempt in flight.
            self._cancels.register(env.request_id, work)
            try:
                await work
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    interrupted = True
                    raise  # shutting down past the grace period
                # The client went away (nobody reads this), or a bug cancelled the work
                # (then the client must not wait for its deadline).
                self._metrics.cancelled.inc()
                await out.error(SwitchyardError("the request was cancelled",
                                                code="request_cancelled"))
                self._counted(decision.mode, "cancelled")
            else:
                self._counted(decision.mode, "ok" if out.ended == "done" else "error")
        finally:
            self._cancels.unregister(env.request_id)
            try:
                # After the answer and its bill are in Redis: a kill before that leaves the
                # client answerless and unbilled (worker_lost), never billed for nothing.
                await out.bill_published()
                if self._budgets is not None and not (env.routing.preview
                                                      and self._preview is not None):
                    # Every attempt's real cost replaces the reservation (never raises).
                    await self._budgets.settle(env)
                # Before the offset can be committed: every attempt's usage event durable.
                await self._settled(env.request_id)
            except asyncio.CancelledError:
                interrupted = True  # shutting down past the grace period, mid-bookkeeping
                raise
            finally:
                if not interrupted:
                    # An interrupted request keeps its claim: once this worker's heartbeat is
                    # gone, its redelivery is reported as worker_lost, or billed from the
                    # bill its answer left, not skipped.
                    await self._claims.finish(env.request_id)

    async def _orphaned(self, env: RequestEnvelope, claim: Claim, out: FrameWriter) -> None:
        events = claim.events()
        if events:
            # Answered, then killed before its usage was durable: the client has its answer,
            # and now the bill. The claim passed to us with the bill; finished once written.
            log.warning("request %s was answered by worker %s, which died before writing its "
                        "usage: writing its %d usage events", env.request_id, claim.owner,
                        len(events))
            await self._rebill(events)
            await self._claims.finish(env.request_id)
            self._metrics.orphans.labels("billed").inc()
            return
        # The provider may already have run (and billed) it: report, never re-run.
        log.warning("request %s was interrupted with worker %s", env.request_id, claim.owner)
        self._metrics.orphans.labels("lost").inc()
        await out.error(UpstreamError(
            "the worker executing this request stopped mid-call; it was not retried so "
            "that it does not run twice", code="worker_lost"))


    def _counted(self, mode: str | None, outcome: str) -> None:
        # None: refused before the tenant's policy was read; its default mode is unknown.
        self._metrics.requests.labels(mode or "default", outcome).inc()


def _discard(task: asyncio.Future[RequestEnvelope] | None) -> None:
    """Cancel work whose result nobody will read, and retrieve its outcome (no warning)."""
    if task is not None:
        task.cancel()
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
