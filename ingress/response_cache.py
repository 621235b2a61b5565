"""The response cache at the ingress: decide per request, answer a hit without Kafka (as JSON
or as a replayed SSE stream), store a miss's answer once it completed, bill each hit.

Deciding costs one dict lookup (the tenant's cache policy, cached in-process for
`cache.policy_cache_ttl_s`) and a header read: a request of a tenant without a cache policy
that sends no `x-switchyard-cache` header never reaches Redis for it. A request is looked up
when the tenant's policy is `enabled` or it says `x-switchyard-cache: on`, and only if its
answer is reproducible (temperature 0) unless the policy allows sampled answers.

A hit has been through authentication, the route's permission and the key's model list (the
handler checks them before asking); it then passes the rate limits as a request reserving
no tokens, whose concurrency slot is freed at once, and reserves no spend (it costs 0)
(`ingress/admission.py` `Admission.admit_cached`). Its usage event (cost 0, no tokens,
`cache_hit: true`, an event id derived from the request id so a replay is one ledger row) is
handed to the producer of `llm.usage` before the answer is sent; the answer does not wait for
the broker's ack, as a client never waits for a router's billing.

Redis unreachable, an entry unreadable, the policy unreadable: the request is served as a
miss (and its store skipped), never refused because of the cache.

The contract (policy, key, assembly and replay) is `topics/response_cache.py`; the entries'
storage, `state/response_cache.py`; docs/cache.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request
from starlette.responses import Response

from ingress.money import exact_costs
from state.cache import ReadThroughCache
from state.response_cache import Entry, encode, get_entry, put_entry
from state.routing_policy import get_policy
from topics import names
from topics.errors import InvalidRequest
from topics.identity import Principal
from topics.messages import MODES, UsageEvent
from topics.response_cache import (
    DIRECTIVES,
    HEADER,
    TTL_HEADER,
    CachePolicy,
    cache_key,
    deterministic,
    replay_chunks,
)
from topics.settings import CacheSettings
from topics.tracing import current_traceparent

log = logging.getLogger(__name__)

Outcome = Literal["hit", "miss", "refresh", "bypass"]  # the response's x-switchyard-cache
_USAGE_NAMESPACE = uuid.UUID("6f1d3c52-6b4e-4bb1-9a43-1f0c2f5a7e10")  # hit event ids
_ENQUEUE_TIMEOUT_S = 1.0


class CacheMetrics:
    """On the ingress's registry (`ingress/metrics.py`), exposed with `_total`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "switchyard_cache_lookups", "Response-cache lookups by outcome (hit, miss, "
            "error: Redis unreachable, served as a miss)", ["outcome"], registry=registry)
        self.stores = Counter("switchyard_cache_stores", "Answers stored in the response cache",
                              registry=registry)
        self.skips = Counter(
            "switchyard_cache_store_skips", "Answers of cached requests not stored, by reason "
            "(too_large; incomplete: a stream that ended without every choice's finish "
            "reason; error: Redis unreachable)",
            ["reason"], registry=registry)


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache does for one request."""

    outcome: Outcome  # so far: "miss" (to look up), "refresh" or "bypass"
    tenant_id: str
    digest: str = ""
    ttl_s: int = 0

    @property
    def header(self) -> dict[str, str]:
        return {HEADER: self.outcome}


class ResponseCache:
    def __init__(self, settings: CacheSettings, client: redis.Redis, producer: AIOKafkaProducer,
                 pool: asyncpg.Pool, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._redis = client
        self._producer = producer
        self.metrics = CacheMetrics(registry)

        async def load(tenant_id: str) -> CachePolicy:
            return (await get_policy(pool, tenant_id)).cache

        self._policies: ReadThroughCache[str, CachePolicy] = ReadThroughCache(
            load, ttl_s=settings.policy_cache_ttl_s)

    def forget(self, tenant_id: str) -> None:
        """The tenant's policy changed (PUT or DELETE /v1/routing/policy on this ingress)."""
        self._policies.invalidate(tenant_id)

    async def plan(self, request: Request, owner: Principal, body: dict[str, Any],
                   routing: dict[str, Any]) -> CachePlan | None:
        """None: the cache plays no part (neither header nor policy asks for it)."""
        directive = request.headers.get(HEADER)
        if directive is not None and directive not in DIRECTIVES:
            raise InvalidRequest(f"{HEADER} must be one of {', '.join(DIRECTIVES)}",
                                 code="invalid_header", param=HEADER)
        if directive == "off":
            return None
        try:
            policy = await self._policies.get(owner.tenant_id)
        except Exception as exc:  # the policy unreadable: served uncached, never refused
            log.warning("cache policy of tenant %s unreadable (%s): not cached",
                        owner.tenant_id, type(exc).__name__)
            return None
        if directive is None and not policy.enabled:
            return None
        ttl_s = self._ttl_s(request.headers.get(TTL_HEADER), policy)
        if not policy.allow_nondeterministic and not deterministic(body):
            return CachePlan("bypass", owner.tenant_id)
        digest = cache_key(owner.tenant_id, "chat.completions", body, routing,
                           owner.allowed_models)
        return CachePlan("refresh" if directive == "refresh" else "miss", owner.tenant_id,
                         digest, ttl_s)

    def _ttl_s(self, raw: str | None, policy: CachePolicy) -> int:
        limit = self._settings.max_ttl_s
        if raw is None:
            return min(policy.ttl_s or self._settings.default_ttl_s, limit)
        try:
            ttl_s = int(raw)
        except ValueError:
            ttl_s = 0
        if not 1 <= ttl_s <= limit:
            raise InvalidRequest(f"{TTL_HEADER} must be whole seconds within [1, {limit}]",
                                 code="invalid_header", param=TTL_HEADER)
        return ttl_s

    async def lookup(self, plan: CachePlan) -> Entry | None:
        try:
            entry = await get_entry(self._redis, plan.tenant_id, plan.digest)
        except Exception as exc:
            self.metrics.lookups.labels("error").inc()
            log.warning("response cache unreachable (%s): served as a miss", type(exc).__name__)
            return None
        self.metrics.lookups.labels("miss" if entry is None else "hit").inc()
        return entry

    async def store(self, plan: CachePlan, completion: dict[str, Any],
                    metadata: dict[str, Any] | None) -> None:
        """Store a complete answer (the caller knows it is); never raises."""
        meta = metadata or {}
        encoded = encode(completion, {k: meta.get(k) for k in ("provider", "model", "mode")})
        if len(encoded) > self._settings.max_entry_bytes:
            self.metrics.skips.labels("too_large").inc()
            return
        try:
            await put_entry(self._redis, plan.tenant_id, plan.digest, encoded, plan.ttl_s)
        except Exception as exc:
            self.metrics.skips.labels("error").inc()
            log.warning("response cache unreachable (%s): answer not stored",
                        type(exc).__name__)
            return
        self.metrics.stores.inc()

    def not_stored(self) -> None:
        self.metrics.skips.labels("incomplete").inc()

    async def bill(self, owner: Principal, request_id: str, entry: Entry,
                   started_s: float) -> float:
        """Hand the hit's usage event to the producer; its latency (ms). The client does not
        wait for the broker's ack (as it never waits for a router's billing): the idempotent
        producer delivers it, a process that stops flushes it first, and only a process killed
        within the milliseconds before the ack loses it, a row of cost 0. A queue that cannot
        take it is logged: the hit cost nothing, and it is still served."""
        latency_ms = round((time.perf_counter() - started_s) * 1000, 3)
        now_ms = int(time.time() * 1000)
        mode = entry.metadata.get("mode")
        event = UsageEvent(
            event_id=str(uuid.uuid5(_USAGE_NAMESPACE, request_id)), request_id=request_id,
            tenant_id=owner.tenant_id, key_id=owner.key_id,
            provider=str(entry.metadata.get("provider") or "cache"),
            model=str(entry.metadata.get("model") or entry.completion.get("model") or ""),
            mode=mode if mode in MODES else "auto", status="ok", cost_usd=Decimal(0),
            latency_ms=latency_ms, started_at_ms=now_ms - int(latency_ms), finished_at_ms=now_ms,
            cache_hit=True)
        headers = [(names.H_REQUEST_ID, request_id.encode()),
                   (names.H_TENANT_ID, owner.tenant_id.encode()),
                   (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON)]
        # The request's trace: the usage worker's write joins it, as for a router's bill.
        if (traceparent := current_traceparent()) is not None:
            headers.append((names.H_TRACEPARENT, traceparent.encode()))
        try:
            # Bounded: a broker that is down must not hold up answers that need none of it.
            async with asyncio.timeout(_ENQUEUE_TIMEOUT_S):
                delivery = await self._producer.send(names.USAGE, event.to_json(),
                                                     key=request_id.encode(), headers=headers)
        except Exception as exc:
            _unrecorded(request_id, exc)
        else:
            delivery.add_done_callback(lambda done: _delivered(request_id, done))
        return latency_ms


def _delivered(request_id: str, delivery: asyncio.Future[Any]) -> None:
    if delivery.cancelled():
        _unrecorded(request_id, asyncio.CancelledError())
    elif (exc := delivery.exception()) is not None:
        _unrecorded(request_id, exc)


def _unrecorded(request_id: str, exc: BaseException) -> None:
    log.warning("usage event of cache hit %s not recorded (%s)", request_id,
                type(exc).__name__)


def hit_completion(entry: Entry, request_id: str, latency_ms: float) -> dict[str, Any]:
    """The stored answer as this request's: its own id and time, `metadata.cache_hit`."""
    completion = {**entry.completion, "id": f"chatcmpl-{request_id.removeprefix('req_')}",
                  "created": int(time.time())}
    completion["metadata"] = exact_costs({
        "provider": entry.metadata.get("provider"), "model": entry.metadata.get("model"),
        "latency_ms": latency_ms, "cost_usd": "0", "cache_hit": True,
        "mode": entry.metadata.get("mode") or "auto", "fallback": False, "attempts": [],
        "cached_at": entry.stored_at_ms // 1000})
    return completion


def hit_response(completion: dict[str, Any]) -> Response:
    return Response(orjson.dumps(completion), media_type="application/json",
                    headers={HEADER: "hit"})


async def replay(completion: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A hit as the SSE events of a live answer: its chunks, the usage chunk if asked for
    (with the metadata), then [DONE]; in one write."""
    metadata = completion.pop("metadata")
    usage = completion.get("usage")
    events = [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in replay_chunks(completion)]
    if include_usage and usage is not None:
        events.append(b"data: " + orjson.dumps({
            "id": completion["id"], "object": "chat.completion.chunk",
            "created": completion["created"], "model": completion.get("model", ""),
            "choices": [], "usage": usage, "metadata": metadata}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    yield b"".join(events)
