"""How a request's attempts are scheduled in the modes that return one route's answer.

- auto: the bandit's best route; on a retryable failure before the first token, the next
  best, within the attempt budget and the deadline. A transient fault (429, 5xx, a connection
  refused or reset before the headers) is first retried on the same route, after a backoff
  or the provider's Retry-After, when that fits the deadline (workers/router/retry.py).
  A failure after tokens reached the client ends the stream with an error event: never a
  truncated answer that looks complete.
- fixed: one route, no failover (its transient faults are retried as in auto).
- speculative: N routes at once; the first to answer streams, the others are cancelled at
  once (their connections closed), each attempt's usage recorded.
- hedged: one route; the next starts only if the first has not answered within that route's
  observed time-to-first-answer percentile. Most of a race's tail cut, few duplicate calls.

One loop serves all four: it keeps up to `width` attempts running, starts the next on a
failure (or, hedging, on the timer), and cancels the rest the moment one takes the lead."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from topics.catalog import Model
from topics.errors import SwitchyardError, Unavailable
from topics.messages import RequestEnvelope
from topics.settings import RouterSettings
from workers.providers.base import Route
from workers.providers.errors import CONTEXT_LENGTH_CODE
from workers.router.attempt import AttemptRunner, Lead, Report, now_ms
from workers.router.decide import Decision
from workers.router.frames import FrameWriter
from workers.router.latency import LatencyTracker
from workers.router.metrics import RouterMetrics
from workers.router.retry import RetryPolicy
from workers.router.routes import RouteResolver

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExecutionSettings:
    max_attempts: int  # failover budget of a one-route request: routes, not calls
    hedge_percentile: float
    hedge_default_delay_ms: float  # before a route has enough observations
    retry: RetryPolicy  # calls to the same route again

    @classmethod
    def from_settings(cls, router: RouterSettings) -> ExecutionSettings:
        return cls(max_attempts=router.max_attempts, hedge_percentile=router.hedge_percentile,
                   hedge_default_delay_ms=router.hedge_default_delay_ms,
                   retry=RetryPolicy.from_settings(router))


class Executor:
    def __init__(self, runner: AttemptRunner, resolver: RouteResolver,
                 latency: LatencyTracker, settings: ExecutionSettings,
                 metrics: RouterMetrics | None = None) -> None:
        self._runner = runner
        self._resolver = resolver
        self._latency = latency
        self._settings = settings
        self._metrics = metrics

    async def run(self, env: RequestEnvelope, decision: Decision, out: FrameWriter) -> None:
        mode = decision.mode
        width = decision.width
        failover = 0 if mode == "fixed" or not env.routing.fallback_enabled \
            else self._settings.max_attempts - 1
        percentile = env.routing.hedge_percentile or self._settings.hedge_percentile
        run = _Run(self._runner, self._resolver, env, decision, Lead(out),
                   budget=width + failover, width=width, retry=self._settings.retry,
                   metrics=self._metrics,
                   hedge_delay_s=(lambda model, streamed: self._hedge_delay_s(
                       model, streamed, percentile)) if mode == "hedged" else None)
        t0 = time.perf_counter()
        reports = await run.execute(initial=width if mode == "speculative" else 1)
        winner = next((r for r in reports if r.led), None)
        if mode == "speculative" and self._metrics is not None:
            answered = winner is not None and winner.error is None
            self._metrics.races.labels("answered" if answered else "failed").inc()
        if winner is None:
            await out.error(run.failure())
        elif winner.error is not None:
            await out.error(winner.error)  # after tokens: the stream ends with the error
        else:
            await out.send("done", _done(env, winner, reports, mode,
                                         (time.perf_counter() - t0) * 1000,
                                         decision.is_fallback(winner.model)))

    def _hedge_delay_s(self, model: Model, streamed: bool, percentile: float) -> float:
        observed = self._latency.percentile(model.id, streamed, percentile)
        return (self._settings.hedge_default_delay_ms if observed is None else observed) / 1000


class _Started(NamedTuple):
    n: int  # attempt number
    model: Model
    provider: str
    route: Route
    retry: int  # 0: the route's first call


class _Run:
    """The attempts of one request."""

    def __init__(self, runner: AttemptRunner, resolver: RouteResolver, env: RequestEnvelope,
                 decision: Decision, lead: Lead, *, budget: int, width: int,
                 retry: RetryPolicy, metrics: RouterMetrics | None,
                 hedge_delay_s: Callable[[Model, bool], float] | None) -> None:
        self._runner = runner
        self._resolver = resolver
        self._env = env
        self._decision = decision
        self._lead = lead
        self._budget = budget  # routes, each with its retries
        self._width = width
        self._retry = retry
        self._metrics = metrics
        self._hedge_delay_s = hedge_delay_s  # None: not hedging
        self._candidates = list(decision.ranked)
        self._running: dict[asyncio.Task[Report], _Started] = {}
        self._reports: list[Report] = []
        self._started = 0  # attempts: calls, retries included (their usage `attempt`)
        self._routes = 0
        self._last_start = 0.0
        self._last_model: Model | None = None
        # Every failure, with the model it happened on.
        self._errors: list[tuple[Model, SwitchyardError]] = []
        self._min_window = 0  # after a context-length refusal: the window that was too small
        self._stop_starting = False
        self._streamed = bool(env.body.get("stream"))

    async def execute(self, initial: int) -> list[Report]:
        # Only when attempts can overlap is there anyone to cancel the moment one leads.
        taken = (asyncio.create_task(self._lead.taken.wait())
                 if self._width > 1 else None)
        try:
            for _ in range(initial):
                await self._start()
            while self._running:
                waiting: list[asyncio.Future[Any]] = [*self._running]
                if taken is not None and not taken.done():
                    waiting.append(taken)
                done, _ = await asyncio.wait(waiting, timeout=self._hedge_in(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._lead.taken.is_set():
                    self._cancel_others()
                if not done:  # the hedge timer: the running route is slower than usual
                    await self._start("hedge")
                    continue
                for task in self._running.keys() & done:
                    await self._finished(task)
                if not self._lead.taken.is_set():
                    while len(self._running) < self._width and await self._start("failover"):
                        pass
        finally:
            if taken is not None:
                taken.cancel()
            for task in self._running:
                task.cancel()  # a client gone, or shutting down: every attempt stops
            for task in list(self._running):
                with contextlib.suppress(asyncio.CancelledError):
                    self._reports.append(await task)
            self._running.clear()
        return sorted(self._reports, key=lambda r: r.n)

    def failure(self) -> SwitchyardError:
        """Why no route answered: the first route's own (latest) error, which a fallback's
        refusal of its own must not hide (a fallback that cannot take an assistant prefill
        says nothing about why the model asked for failed), with how many attempts were
        made and how the last one ended."""
        if not self._errors:
            return Unavailable("no eligible route could be called", code="no_route_available")
        first = self._errors[0][0]
        primary = next(e for m, e in reversed(self._errors) if m is first)
        if self._started <= 1:
            return primary
        last_model, last = self._errors[-1]
        then = "" if last is primary else f"; the last, on {last_model.id}: {last.code}"
        return type(primary)(f"{primary.message} (after {self._started} attempts{then})",
                             code=primary.code, param=primary.param,
                             retryable=primary.retryable, retry_after_s=primary.retry_after_s)

    def _hedge_in(self) -> float | None:
        if not (self._hedge_delay_s is not None and self._last_model is not None
                and self._can_start() and len(self._running) < self._width):
            return None
        delay = self._hedge_delay_s(self._last_model, self._streamed)
        return max(self._last_start + delay - time.perf_counter(), 0.0)

    def _can_start(self) -> bool:
        return (not self._stop_starting and bool(self._candidates)
                and self._routes < self._budget and not self._lead.taken.is_set())

    async def _start(self, why: str | None = None) -> bool:
        """Start an attempt on the next candidate that can take one; False if none can.
        `why` (failover, hedge) is counted; None: one of the request's first attempts."""
        while self._can_start():
            model = self._candidates.pop(0)
            if model.context_window <= self._min_window:
                continue  # a model whose window is no larger already said it does not fit
            if not await self._runner.may_call(model):
                continue  # its breaker is open and another request holds the probe
            try:
                route = await self._resolver.resolve(model, self._env.tenant_id)
            except SwitchyardError as exc:
                self._errors.append((model, exc))  # e.g. no key for that provider: the next
                continue
            self._started += 1
            self._routes += 1
            self._last_start, self._last_model = time.perf_counter(), model
            task = asyncio.create_task(self._runner.run(
                self._env, self._decision, model, route, self._started, self._lead,
                mode=self._decision.mode))
            self._running[task] = _Started(self._started, model, route.provider, route, 0)
            if why is not None and self._metrics is not None:
                (self._metrics.hedges if why == "hedge" else self._metrics.failovers).inc()
            return True
        return False

    async def _retry_later(self, failed: _Started, error: SwitchyardError) -> bool:
        """Call the route that failed with `error` again after its wait, if it may be (its
        breaker, which has counted the failure, still lets it be called); False if not (the
        request fails over, or fails)."""
        if self._stop_starting or self._lead.taken.is_set():
            return False
        retry = failed.retry + 1
        wait_ms = self._retry.wait_ms(error, retry, self._env.deadline_ms - now_ms())
        if wait_ms is None or not await self._runner.may_call(failed.model):
            return False
        self._started += 1
        log.info("request %s: %s failed (%s); calling it again in %.0f ms (retry %d)",
                 self._env.request_id, failed.model.id, error.code, wait_ms, retry)
        if self._metrics is not None:
            self._metrics.route_retries.labels(failed.provider, error.code).inc()
        task = asyncio.create_task(self._call_later(wait_ms / 1000, failed.model, failed.route,
                                                    self._started))
        self._running[task] = failed._replace(n=self._started, retry=retry)
        return True

    async def _call_later(self, wait_s: float, model: Model, route: Route, n: int) -> Report:
        # Cancelled while it waits (another attempt answered, the client left): it never
        # reached the provider, and reports as an attempt cancelled before it ran.
        await asyncio.sleep(wait_s)
        return await self._runner.run(self._env, self._decision, model, route, n, self._lead,
                                      mode=self._decision.mode)

    async def _finished(self, task: asyncio.Task[Report]) -> None:
        started = self._running.pop(task)
        if task.cancelled():
            # Dropped before it could report (usually before it ever ran, the lead taken in
            # the same turn). If it did reach the provider, its usage event is recorded.
            self._reports.append(Report(started.n, started.model, started.provider,
                                        status="cancelled", error=SwitchyardError(
                                            "another route answered first", code="race_lost")))
            return
        report = task.result()
        self._reports.append(report)
        error = report.error
        if error is not None and not report.led and error.code != "race_lost":
            self._errors.append((started.model, error))
            if error.code == CONTEXT_LENGTH_CODE:
                # Only a larger context window may take this prompt.
                self._min_window = max(self._min_window, started.model.context_window)
            if not error.retryable:
                self._stop_starting = True  # another route would be refused the same way
            else:
                await self._retry_later(started, error)

    def _cancel_others(self) -> None:
        for task, started in self._running.items():
            n = started.n
            if n != self._lead.holder and n not in self._lead.dropped:
                self._lead.dropped.add(n)  # the attempt reports itself as a lost race
                task.cancel()


def _done(env: RequestEnvelope, winner: Report, reports: list[Report], mode: str,
          latency_ms: float, fallback: bool) -> dict[str, Any]:
    done: dict[str, Any] = {"usage": winner.usage.to_openai()}
    if winner.answer is not None and not env.body.get("stream"):
        done["embeddings" if env.endpoint == "embeddings" else "completion"] = winner.answer
    done["metadata"] = {
        "provider": winner.provider, "model": winner.model.id,
        "latency_ms": round(latency_ms, 3),
        # What the request cost: every attempt, the failed and the abandoned included.
        "cost_usd": str(sum((r.cost_usd for r in reports), Decimal(0))),
        "cache_hit": False, "mode": mode,
        # Served by a route other than the one the request asked for (or, for "auto", the
        # router's first choice): a fallback in the chain, a substitute, or a failover.
        "fallback": fallback,
        "attempts": [r.summary() for r in reports]}
    return done
