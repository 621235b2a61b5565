"""One call to one route, and everything it leaves behind: its usage event, what it teaches
the bandit (through `workers/router/decide.py`), its outcome on the route's circuit breaker
(`state/breakers.py`), its time to first answer.

Several attempts of one request may run at once (racing, hedging) or one after the other
(failover), so an attempt does not own the client's output: it takes the request's `Lead`
when its first token (or whole answer) arrives. Only the attempt holding the lead writes to
the client; a streamed attempt holds back what precedes its first token (the role chunk), so
an attempt that fails before answering leaves no trace the client can see.

An attempt's usage event is built the moment it ends; the request's events so far are its
bill (`bill`), which the answer's last frame carries (`workers/router/frames.py`), and are
produced to `llm.usage` once the request has answered (`settled`), or before its last frame
when that goes to a Kafka reply topic (`bill_durable`). `produce_usage` is the one way they
are produced: also by the worker that finds a dead worker's bill (`workers/router/worker.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from opentelemetry.trace import StatusCode

from state.breakers import Breakers
from topics import names
from topics.catalog import Model
from topics.errors import GatewayTimeout, InvalidRequest, SwitchyardError
from topics.messages import Mode, RequestEnvelope, UsageEvent, UsageStatus
from topics.tracing import Span, SpanKind, Tracing, current_traceparent
from workers.providers.base import Dialect, Embedder, Route, Usage
from workers.providers.errors import AUTH_CODE, CONTEXT_LENGTH_CODE
from workers.router.decide import Decider, Decision
from workers.router.frames import FrameWriter
from workers.router.latency import LatencyTracker
from workers.router.metrics import RouterMetrics

# Failures that say nothing about the route's health (the request or our key is at fault).
_NO_USAGE = Usage(0, 0)

# Failures that say nothing about a route's health: the request itself was at fault (a
# prompt too long for that model included). `upstream_auth` is not among them: a refused key
# opens the route's breaker at once.
_NEUTRAL_CODES = frozenset({"upstream_bad_request", "upstream_content_filtered",
                            CONTEXT_LENGTH_CODE, "unsupported_parameter",
                            "unsupported_endpoint"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Lost(Exception):
    """Another attempt of the same request answered first."""


class Lead:
    """Which attempt of a request writes to the client: the first to answer."""

    def __init__(self, out: FrameWriter | None) -> None:
        self.out = out  # None: nobody streams (council members, the judge)
        self.holder: int | None = None
        self.taken = asyncio.Event()
        # Attempts cancelled because another answered first: they end with a report, where
        # any other cancellation (the client gone, shutdown) propagates.
        self.dropped: set[int] = set()

    def take(self, attempt: int) -> bool:
        if self.holder is None:
            self.holder = attempt
            self.taken.set()
        return self.holder == attempt


@dataclass(slots=True)
class Report:
    """What one attempt did."""

    n: int
    model: Model
    provider: str
    status: UsageStatus = "cancelled"
    error: SwitchyardError | None = None
    usage: Usage = _NO_USAGE
    estimated: bool = False
    cost_usd: Decimal = Decimal(0)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    led: bool = False
    answer: dict[str, Any] | None = None  # the completion or embeddings (not streamed)
    reported: Usage | None = None  # what the provider said it used, if it said
    chunks: int = 0  # tokens streamed
    # For the attempt's span (GenAI conventions): the provider's own name for the model that
    # answered, why it stopped, and (SWITCHYARD_TRACE_CONTENT only) the streamed text.
    response_model: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    text: list[str] | None = None

    def summary(self) -> dict[str, Any]:
        """This attempt as the response's metadata lists it."""
        out: dict[str, Any] = {"attempt": self.n, "provider": self.provider,
                               "model": self.model.id, "status": self.status,
                               "cost_usd": str(self.cost_usd),
                               "latency_ms": round(self.latency_ms, 3)}
        if self.estimated:
            out["estimated"] = True
        if self.error is not None:
            out["error"] = self.error.code
        return out


@dataclass(slots=True)
class _Books:
    """One request's bookkeeping not yet written."""

    events: list[UsageEvent] = field(default_factory=list)  # its bill, in attempts' order
    durable: int = 0  # events[:durable] are on llm.usage already
    lessons: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class AttemptRunner:
    """Runs attempts for the worker; one per process, shared by every request."""

    def __init__(self, *, dialects: dict[str, Dialect], producer: AIOKafkaProducer,
                 decider: Decider, breakers: Breakers, latency: LatencyTracker,
                 metrics: RouterMetrics, tracing: Tracing | None = None) -> None:
        self._dialects = dialects
        self._producer = producer
        self._decider = decider
        self._breakers = breakers
        self._latency = latency
        self._metrics = metrics
        self._breaker_seen: dict[str, str] = {}  # route → last state, for the metrics
        self._tracing = tracing or Tracing()
        # request id → its attempts' bookkeeping, not yet written
        self._books: dict[str, _Books] = {}

    async def run(self, env: RequestEnvelope, decision: Decision, model: Model, route: Route,
                  n: int, lead: Lead, *, mode: Mode, body: dict[str, Any] | None = None,
                  teach: bool = True, timeout_s: float | None = None) -> Report:
        """Call the route; never raises for the route's failures (they are in the report),
        only CancelledError. `timeout_s` bounds this attempt below the request's deadline."""
        body = env.body if body is None else body
        tracing = self._tracing
        if not tracing.on:
            return await self._run(env, decision, model, route, n, lead, mode, body, teach,
                                   timeout_s, Report(n, model, route.provider))
        # A CLIENT span per call, as the OpenTelemetry GenAI conventions describe it.
        operation = "embeddings" if env.endpoint == "embeddings" else "chat"
        report = Report(n, model, route.provider, text=[] if tracing.content else None)
        with tracing.span(f"{operation} {model.id}", kind=SpanKind.CLIENT, attributes={
                "gen_ai.operation.name": operation, "gen_ai.system": route.provider,
                "gen_ai.provider.name": route.provider,
                "gen_ai.request.model": route.upstream_model, "switchyard.model": model.id,
                "switchyard.attempt": n, "switchyard.mode": mode}) as span:
            if tracing.content and operation == "chat":
                span.set_attribute("gen_ai.input.messages",
                                   orjson.dumps(body.get("messages")).decode())
            await self._run(env, decision, model, route, n, lead, mode, body, teach, timeout_s,
                            report)
            describe_attempt(span, report, content=tracing.content)
        return report

    async def _run(self, env: RequestEnvelope, decision: Decision, model: Model, route: Route,
                   n: int, lead: Lead, mode: Mode, body: dict[str, Any], teach: bool,
                   timeout_s: float | None, report: Report) -> Report:
        started_ms = now_ms()
        t0 = time.perf_counter()
        streamed = bool(body.get("stream")) and env.endpoint == "chat.completions"
        left_s = max(env.deadline_ms - now_ms(), 1) / 1000
        limit_s = left_s if timeout_s is None else min(left_s, timeout_s)
        own_limit = limit_s < left_s
        try:
            async with asyncio.timeout(limit_s):
                if env.endpoint == "embeddings":
                    answer = await self._embed(route, body, env.request_id)
                    report.reported = Usage.from_openai(answer.get("usage"))
                    report.response_model = answer.get("model")
                    report.estimated = bool(answer.pop("usage_estimated", False))
                elif streamed:
                    answer = {}
                    await self._stream(route, body, env.request_id, lead, report, t0)
                else:
                    answer = await self._dialects[route.dialect].complete(
                        route, body, env.request_id)
                    report.reported = Usage.from_openai(answer.get("usage"))
                    report.response_model = answer.get("model")
                if not report.led:  # an answer without a single token is an answer
                    report.ttft_ms = (time.perf_counter() - t0) * 1000
                    await self._take_lead(lead, report, route)
                answer["model"] = model.id
                report.answer = answer
            report.status = "ok"
        except Lost:
            report.status = "cancelled"
            report.error = SwitchyardError("another route answered first", code="race_lost")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Dropped and nothing else pending (a client leaving cancels once more).
            if n not in lead.dropped or task is None or task.uncancel() > 0:
                raise
            report.status = "cancelled"
            report.error = SwitchyardError("another route answered first", code="race_lost")
        except TimeoutError:
            report.status, report.error = "timeout", GatewayTimeout(
                f"no answer within {limit_s:g} s" if own_limit
                else "the request ran past its deadline",
                code="attempt_timeout" if own_limit else "deadline_exceeded", retryable=True)
        except SwitchyardError as exc:
            report.status, report.error = "error", exc
        finally:
            report.latency_ms = (time.perf_counter() - t0) * 1000
            report.usage, estimated = _usage(report, body)
            report.estimated = report.estimated or estimated
            report.cost_usd = model.cost_usd(report.usage.prompt_tokens,
                                             report.usage.completion_tokens,
                                             report.usage.cached_tokens)
            self._metrics.attempt(route.provider, model.id, report.status, report.latency_ms,
                                  report.ttft_ms, report.usage, report.cost_usd, env.tenant_id)
            self._observe_latency(report, streamed, mode)
            # The client's answer waits for none of the bookkeeping: it is written once the
            # request has answered (`settled`), before its offset can be committed. Started
            # here, it would run ahead of the publish of the answer. The usage event is built
            # now (the answer's last frame carries it); a failure is taught at once: the
            # breaker must count it before anyone can act on it (the client on a 502, the
            # next request choosing a route).
            books = self._books.setdefault(env.request_id, _Books())
            if report.error is None or report.error.code != "upstream_unreachable":
                # A provider we could not even connect to did not serve (or bill) an attempt.
                books.events.append(_usage_event(env, report, started_ms, mode))
            lesson = functools.partial(self._teach, env, decision, report, streamed,
                                       teach=teach)
            if report.status in ("error", "timeout"):
                await lesson()
            else:
                books.lessons.append(lesson)
        return report

    def bill(self, request_id: str) -> list[UsageEvent]:
        """The usage events of the request's attempts so far (they stay to be written)."""
        books = self._books.get(request_id)
        return list(books.events) if books is not None else []

    async def bill_durable(self, request_id: str) -> None:
        """Produce the request's usage events so far, now; `settled` does not repeat them."""
        books = self._books.get(request_id)
        if books is None or books.durable == len(books.events):
            return
        upto = len(books.events)
        await self._produce(books.events[books.durable:upto])
        books.durable = upto

    async def settled(self, request_id: str) -> None:
        """Write the bookkeeping of every attempt of the request: usage events (durable when
        this returns), breaker outcomes, what the bandit learns. Raises if any of it failed."""
        books = self._books.pop(request_id, None)
        if books is None:
            return
        pending = [settle() for settle in books.lessons]
        if books.durable < len(books.events):
            pending.append(self._produce(books.events[books.durable:]))
        if pending:
            await asyncio.gather(*pending)

    async def _produce(self, events: Sequence[UsageEvent]) -> None:
        with self._tracing.span(f"{names.USAGE} publish", kind=SpanKind.PRODUCER, attributes={
                "messaging.system": "kafka", "messaging.operation.type": "send",
                "messaging.destination.name": names.USAGE,
                "messaging.batch.message_count": len(events)}):
            await produce_usage(self._producer, events)

    async def _stream(self, route: Route, body: dict[str, Any], request_id: str, lead: Lead,
                      report: Report, t0: float) -> None:
        held: list[dict[str, Any]] = []
        # aclosing: an attempt that loses its race closes its connection at once, not
        # whenever the abandoned generator is collected.
        async with contextlib.aclosing(
                self._dialects[route.dialect].stream(route, body, request_id)) as stream:
            async for chunk in stream:
                report.reported = Usage.from_openai(chunk.get("usage")) or report.reported
                choices = chunk.get("choices")
                if not choices:
                    continue  # the usage-only chunk: sent in `done`, if asked for
                delta = choices[0].get("delta") or {}
                chunk.pop("usage", None)
                if report.response_model is None:
                    report.response_model = chunk.get("model")
                chunk["model"] = report.model.id
                if choices[0].get("finish_reason"):
                    report.finish_reasons.append(choices[0]["finish_reason"])
                if report.text is not None and delta.get("content"):
                    report.text.append(delta["content"])
                if delta.get("content") or delta.get("tool_calls"):
                    report.chunks += 1
                    if not report.led:
                        report.ttft_ms = (time.perf_counter() - t0) * 1000
                        await self._take_lead(lead, report, route)
                if report.led:
                    for early in held:
                        await _write(lead, early)
                    held.clear()
                    await _write(lead, chunk)
                else:
                    held.append(chunk)
        if not report.led:
            report.ttft_ms = (time.perf_counter() - t0) * 1000
            await self._take_lead(lead, report, route)
            for early in held:
                await _write(lead, early)

    async def may_call(self, model: Model) -> bool:
        """Whether the route's circuit breaker lets an attempt start (closed, or this is the
        probe of an open one)."""
        return await self._breakers.acquire_probe(model.id)

    async def _embed(self, route: Route, body: dict[str, Any],
                     request_id: str) -> dict[str, Any]:
        dialect = self._dialects[route.dialect]
        if not isinstance(dialect, Embedder):
            raise InvalidRequest(f"{route.provider} serves no embeddings",
                                 code="unsupported_endpoint", param="model")
        return await dialect.embed(route, body, request_id)

    async def _take_lead(self, lead: Lead, report: Report, route: Route) -> None:
        if not lead.take(report.n):
            raise Lost
        report.led = True
        if lead.out is not None:
            await lead.out.send("meta", {"provider": route.provider, "model": report.model.id,
                                         "attempt": report.n})

    async def _teach(self, env: RequestEnvelope, decision: Decision, report: Report,
                     streamed: bool, *, teach: bool) -> None:
        """The attempt's outcome to its route's breaker and, if `teach`, to the bandit."""
        error = report.error
        if report.status == "cancelled":
            return  # a client leaving, or a race lost, says nothing about the route
        if error is None or (error.retryable and error.code not in _NEUTRAL_CODES):
            before = self._breaker_seen.get(report.model.id)
            state = await self._breakers.record(
                report.model.id, error is None,
                open_now=error is not None and error.code == AUTH_CODE)
            self._breaker_seen[report.model.id] = state.value
            if state.value != before:
                self._metrics.breaker(report.model.id, before, state.value)
        if teach and env.endpoint == "chat.completions":
            await self._decider.learn(
                f"{env.request_id}:{report.n}", decision, report.model,
                success=report.status == "ok",
                latency_ms=report.ttft_ms if streamed and report.ttft_ms else report.latency_ms,
                prompt_tokens=report.usage.prompt_tokens,
                completion_tokens=report.usage.completion_tokens,
                cached_tokens=report.usage.cached_tokens)

    def _observe_latency(self, report: Report, streamed: bool, mode: Mode) -> None:
        error = report.error
        if report.status == "ok" and report.ttft_ms is not None:
            self._latency.observe(report.model.id, streamed, report.ttft_ms)
        elif mode == "hedged" and report.ttft_ms is None and error is not None \
                and error.code == "race_lost":
            # A hedged-over attempt was slower than this: without it, the percentile would
            # be learnt from the fast calls only and hedges would start ever earlier.
            self._latency.observe(report.model.id, streamed, report.latency_ms)


def _usage_event(env: RequestEnvelope, report: Report, started_ms: int,
                 mode: Mode) -> UsageEvent:
    usage = report.usage
    return UsageEvent(
        event_id=str(uuid.uuid4()), request_id=env.request_id, tenant_id=env.tenant_id,
        key_id=env.key_id, provider=report.provider, model=report.model.id,
        category=env.category, mode=mode, status=report.status,
        error_code=report.error.code if report.error else None,
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens, estimated=report.estimated,
        cost_usd=report.cost_usd, latency_ms=round(report.latency_ms, 3),
        ttft_ms=None if report.ttft_ms is None else round(report.ttft_ms, 3),
        attempt=report.n, started_at_ms=started_ms, finished_at_ms=now_ms())


async def produce_usage(producer: AIOKafkaProducer, events: Sequence[UsageEvent]) -> None:
    """Produce `events` to `llm.usage`; durable when this returns. The same event again (a
    dead worker's bill written by its successor) is one ledger row: it is keyed by event id.
    They carry the current trace (`traceparent`): the usage worker's write joins it."""
    traceparent = current_traceparent()
    extra = [(names.H_TRACEPARENT, traceparent.encode())] if traceparent else []
    sent = [await producer.send(
        names.USAGE, event.to_json(), key=event.request_id.encode(),
        headers=[(names.H_REQUEST_ID, event.request_id.encode()),
                 (names.H_TENANT_ID, event.tenant_id.encode()),
                 (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON), *extra]) for event in events]
    await asyncio.gather(*sent)


def describe_attempt(span: Span, report: Report, *, content: bool) -> None:
    """The attempt's outcome on its span (GenAI conventions: no text unless `content`)."""
    usage = report.usage
    span.set_attributes({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                         "gen_ai.usage.output_tokens": usage.completion_tokens,
                         "switchyard.attempt.status": report.status,
                         "switchyard.usage.estimated": report.estimated,
                         "switchyard.cost_usd": str(report.cost_usd)})
    answer = report.answer
    if answer is not None and not report.finish_reasons:
        report.finish_reasons = [str(c.get("finish_reason")) for c in answer.get("choices") or ()
                                 if isinstance(c, dict) and c.get("finish_reason")]
    if report.response_model:
        span.set_attribute("gen_ai.response.model", report.response_model)
    if report.finish_reasons:
        span.set_attribute("gen_ai.response.finish_reasons", report.finish_reasons)
    if report.ttft_ms is not None:
        span.set_attribute("switchyard.ttft_ms", round(report.ttft_ms, 3))
    if report.error is not None:
        span.set_attribute("error.type", report.error.code)
        if report.status in ("error", "timeout"):  # a lost race is no failure of the route
            span.set_status(StatusCode.ERROR, report.error.code)
    if content:
        if report.text is not None and report.text:
            span.set_attribute("gen_ai.output.messages", orjson.dumps(
                [{"role": "assistant", "content": "".join(report.text)}]).decode())
        elif answer is not None and answer.get("choices"):
            span.set_attribute("gen_ai.output.messages", orjson.dumps(
                [c.get("message") for c in answer["choices"] if isinstance(c, dict)]).decode())


async def _write(lead: Lead, chunk: dict[str, Any]) -> None:
    if lead.out is not None:
        await lead.out.chunk(chunk)


def _estimate(body: dict[str, Any], chunks: int) -> Usage:
    """When a provider reports no usage: about four characters a token, one token a streamed
    chunk."""
    texts = body.get("input") if "input" in body else [
        m.get("content") for m in body.get("messages") or () if isinstance(m, dict)]
    return Usage(prompt_tokens=max(len(orjson.dumps(texts)) // 4, 1), completion_tokens=chunks)


def _usage(report: Report, body: dict[str, Any]) -> tuple[Usage, bool]:
    """What the attempt used, and whether that is an estimate. A provider that answered with
    an error status served nothing and bills nothing; one that was cut off, timed out or
    abandoned (a lost race, a client gone) had the prompt and may bill it: estimated, and
    marked."""
    if report.reported is not None:
        return report.reported, False
    code = report.error.code if report.error is not None else None
    if report.status == "error" and report.chunks == 0 and code != "upstream_stream_cut":
        return Usage(0, 0), False
    return _estimate(body, report.chunks), True
