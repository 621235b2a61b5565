"""What the router does with one request: check its deadline, claim it, resolve its model,
call the provider, stream reply frames, and emit one usage event per attempt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from state.claims import ClaimResult, Claims
from topics import names
from topics.catalog import Model
from topics.errors import (
    GatewayTimeout,
    InvalidRequest,
    SwitchyardError,
    UpstreamError,
)
from topics.messages import RequestEnvelope, UsageEvent, UsageStatus
from workers.providers.base import Dialect, Embedder, Route, Usage
from workers.router.cancel import CancelListener
from workers.router.decide import Decider, Decision
from workers.router.frames import FrameWriter
from workers.router.metrics import RouterMetrics
from workers.router.routes import RouteResolver

log = logging.getLogger(__name__)

def now_ms() -> int:
    return time.time_ns() // 1_000_000


class RouterWorker:
    def __init__(self, *, decider: Decider, routes: RouteResolver, claims: Claims,
                 dialects: Mapping[str, Dialect], producer: AIOKafkaProducer,
                 frames: Callable[[RequestEnvelope], FrameWriter], cancels: CancelListener,
                 metrics: RouterMetrics) -> None:
        self._decider = decider
        self._routes = routes
        self._claims = claims
        self._dialects = dialects
        self._producer = producer
        self._frames = frames
        self._cancels = cancels
        self._metrics = metrics

    async def handle(self, env: RequestEnvelope, _record: Any) -> None:
        out = self._frames(env)
        try:
            await self._handle(env, out)
        except Exception:
            # Unexpected (a bug, or Redis/Kafka failing): the consumer loop dead-letters the
            # request; the client must hear that it failed rather than wait for its deadline.
            with contextlib.suppress(Exception):
                await out.error(SwitchyardError("the router failed on this request",
                                                code="router_failed"))
            raise

    async def _handle(self, env: RequestEnvelope, out: FrameWriter) -> None:
        if now_ms() >= env.deadline_ms:
            self._metrics.expired.inc()
            await out.error(GatewayTimeout("the request waited past its deadline and was not "
                                           "executed", code="deadline_exceeded"))
            return
        claim, owner = await self._claims.claim(env.request_id)
        if claim is ClaimResult.ORPHANED:
            # The provider may already have run (and billed) it: report, never re-run.
            log.warning("request %s was interrupted with worker %s", env.request_id, owner)
            await out.error(UpstreamError(
                "the worker executing this request stopped mid-call; it was not retried so "
                "that it does not run twice", code="worker_lost"))
            return
        if claim is not ClaimResult.CLAIMED:
            self._metrics.skipped.labels(claim.value).inc()
            return
        interrupted = False
        try:
            try:
                decision = await self._decider.decide(env)
                route = await self._routes.resolve(decision.model, env.tenant_id)
            except SwitchyardError as exc:
                await out.error(exc)
                return
            attempt = asyncio.create_task(self._attempt(env, decision, route, out))
            self._cancels.register(env.request_id, attempt)
            try:
                await attempt
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    interrupted = True
                    raise  # shutting down past the grace period
                self._metrics.cancelled.inc()  # the client went away: nothing to answer
        finally:
            self._cancels.unregister(env.request_id)
            if not interrupted:
                # An interrupted request keeps its running claim: once this worker's
                # heartbeat is gone, its redelivery is reported as worker_lost, not skipped.
                await self._claims.finish(env.request_id)

    async def _attempt(self, env: RequestEnvelope, decision: Decision, route: Route,
                       out: FrameWriter) -> None:
        model = decision.model
        started_ms = now_ms()
        t0 = time.perf_counter()
        ttft_ms: float | None = None
        reported: Usage | None = None
        chunks = 0
        status: UsageStatus = "ok"
        error: SwitchyardError | None = None
        settled: tuple[Usage, bool] | None = None
        estimated_upstream = False
        dialect = self._dialects[route.dialect]
        try:
            async with asyncio.timeout(max(env.deadline_ms - now_ms(), 1) / 1000):
                await out.send("meta", {"provider": route.provider, "model": model.id,
                                        "attempt": 1})
                done: dict[str, Any] = {}
                if env.endpoint == "embeddings":
                    if not isinstance(dialect, Embedder):
                        raise InvalidRequest(f"{route.provider} serves no embeddings",
                                             code="unsupported_endpoint", param="model")
                    embeddings = await dialect.embed(route, env.body, env.request_id)
                    ttft_ms = (time.perf_counter() - t0) * 1000
                    # An embedding API that reports no usage gets the adapter's estimate: the
                    # same figures the client sees, marked as estimated in the ledger.
                    estimated_upstream = bool(embeddings.pop("usage_estimated", False))
                    reported = Usage.from_openai(embeddings.get("usage"))
                    embeddings["model"] = model.id
                    done["embeddings"] = embeddings
                elif env.body.get("stream"):
                    async for chunk in dialect.stream(route, env.body, env.request_id):
                        reported = Usage.from_openai(chunk.get("usage")) or reported
                        choices = chunk.get("choices")
                        if not choices:
                            continue  # the usage-only chunk: sent in `done`, if asked for
                        delta = choices[0].get("delta") or {}
                        if delta.get("content") or delta.get("tool_calls"):
                            # A token arrived (not the role or the finish chunk).
                            if ttft_ms is None:
                                ttft_ms = (time.perf_counter() - t0) * 1000
                            chunks += 1
                        chunk.pop("usage", None)
                        chunk["model"] = model.id
                        await out.chunk(chunk)
                else:
                    completion = await dialect.complete(route, env.body, env.request_id)
                    ttft_ms = (time.perf_counter() - t0) * 1000
                    reported = Usage.from_openai(completion.get("usage"))
                    completion["model"] = model.id
                    done["completion"] = completion
            settled = _settle_usage(reported, env.body, chunks)
            if estimated_upstream:
                settled = (settled[0], True)
            usage = settled[0]
            done["usage"] = usage.to_openai()
            done["metadata"] = {"provider": route.provider, "model": model.id,
                                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                                "cost_usd": str(model.cost_usd(usage.prompt_tokens,
                                                               usage.completion_tokens,
                                                               usage.cached_tokens)),
                                "cache_hit": False}
            await out.send("done", done)
        except TimeoutError:
            status, error = "timeout", GatewayTimeout(
                "the request ran past its deadline", code="deadline_exceeded")
        except SwitchyardError as exc:
            status, error = "error", exc
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            if error is not None:
                await out.error(error)
            # A provider we could not even connect to did not serve (or bill) an attempt.
            latency_ms = (time.perf_counter() - t0) * 1000
            usage, estimated = settled or _settle_usage(reported, env.body, chunks)
            if error is None or error.code != "upstream_unreachable":
                await self._record(env, model, route, status, error, (usage, estimated),
                                   started_ms, latency_ms, ttft_ms)
            if status != "cancelled" and env.endpoint == "chat.completions":
                # What the route did teaches the bandit (a client leaving teaches nothing).
                await self._decider.learn(
                    f"{env.request_id}:1", decision, success=status == "ok",
                    latency_ms=ttft_ms if env.body.get("stream") and ttft_ms else latency_ms,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens)

    async def _record(self, env: RequestEnvelope, model: Model, route: Route,
                      status: UsageStatus, error: SwitchyardError | None,
                      settled: tuple[Usage, bool], started_ms: int, latency_ms: float,
                      ttft_ms: float | None) -> None:
        usage, estimated = settled
        event = UsageEvent(
            event_id=str(uuid.uuid4()), request_id=env.request_id, tenant_id=env.tenant_id,
            key_id=env.key_id, provider=route.provider, model=model.id,
            category=env.category, mode=env.routing.mode, status=status,
            error_code=error.code if error else None,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, estimated=estimated,
            cost_usd=model.cost_usd(usage.prompt_tokens, usage.completion_tokens,
                                    usage.cached_tokens),
            latency_ms=round(latency_ms, 3),
            ttft_ms=None if ttft_ms is None else round(ttft_ms, 3),
            attempt=1, started_at_ms=started_ms, finished_at_ms=now_ms(),
        )
        self._metrics.observe(route.provider, status, latency_ms, ttft_ms)
        # Awaited: the request's offset is committed only once its usage is durable.
        await self._producer.send_and_wait(
            names.USAGE, event.to_json(), key=env.request_id.encode(),
            headers=[(names.H_REQUEST_ID, env.request_id.encode()),
                     (names.H_TENANT_ID, env.tenant_id.encode()),
                     (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON)])


def _settle_usage(usage: Usage | None, body: dict[str, Any], chunks: int) -> tuple[Usage, bool]:
    """The provider's usage, or, when it sent none, an estimate (marked as such): about four
    characters a token, one token a streamed chunk."""
    if usage is not None:
        return usage, False
    texts = body.get("input") if "input" in body else [
        m.get("content") for m in body.get("messages") or () if isinstance(m, dict)]
    prompt_chars = len(orjson.dumps(texts))
    return Usage(prompt_tokens=max(prompt_chars // 4, 1), completion_tokens=chunks,
                 cached_tokens=0), True


