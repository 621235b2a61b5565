"""GET /v1/models, /v1/health and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import orjson
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import Authenticator
from ingress.metrics import IngressMetrics
from topics.catalog import Catalog


@dataclass(frozen=True, slots=True)
class OpsDeps:
    auth: Authenticator
    catalog: Catalog
    producer: AIOKafkaProducer
    redis: redis.Redis
    pool: asyncpg.Pool
    metrics: IngressMetrics
    health_timeout_s: float


def models_route(deps: OpsDeps) -> Callable[[Request], Awaitable[Response]]:
    # OpenAI's list shape; the catalog's facts ride along as extra fields on each model.
    listing = orjson.dumps({"object": "list", "data": [
        {"id": m.id, "object": "model", "created": 0, "owned_by": m.provider,
         "kind": m.kind, "class": m.class_, "aliases": m.aliases,
         "capabilities": m.capabilities, "context_window": m.context_window,
         "pricing": {"currency": "USD", "unit": "1M tokens",
                     "input_per_mtok": str(m.input_per_mtok),
                     "cached_input_per_mtok": str(m.cached_input_per_mtok),
                     "output_per_mtok": str(m.output_per_mtok)}}
        for m in deps.catalog.models]})

    async def models(request: Request) -> Response:
        await deps.auth.authenticate(request.headers.get("authorization"))
        return Response(listing, media_type="application/json")

    return models


def health_route(deps: OpsDeps) -> Callable[[Request], Awaitable[Response]]:
    async def kafka() -> None:
        await deps.producer.client.fetch_all_metadata()
        if not deps.producer.client.cluster.brokers():
            raise ConnectionError("no brokers")

    async def redis_ping() -> None:
        await deps.redis.ping()

    async def postgres() -> None:
        await deps.pool.fetchval("SELECT 1")

    checks = {"kafka": kafka, "redis": redis_ping, "postgres": postgres}

    async def check(name: str) -> tuple[str, str]:
        try:
            async with asyncio.timeout(deps.health_timeout_s):
                await checks[name]()
            return name, "ok"
        except Exception as exc:  # any failure at all means "down"; say which and why
            return name, f"down: {type(exc).__name__}: {exc}"[:300]

    async def health(_request: Request) -> Response:
        results = dict(await asyncio.gather(*(check(name) for name in checks)))
        down = [name for name, state in results.items() if state != "ok"]
        body: dict[str, object] = {"status": "ok" if not down else "degraded",
                                   "checks": results}
        if down:
            body["error"] = {"message": f"unavailable: {', '.join(down)}",
                             "type": "server_error", "code": "dependency_down", "param": None}
        return Response(orjson.dumps(body), status_code=503 if down else 200,
                        media_type="application/json")

    return health


def metrics_route(deps: OpsDeps) -> Callable[[Request], Awaitable[Response]]:
    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
