"""GET /v1/models, /v1/health, the probes (/healthz, /readyz) and /metrics.

Probes, for an orchestrator: `/healthz` is liveness (the process answers; it calls nothing,
so an outage of Kafka, Redis or PostgreSQL never gets the ingress restarted), `/readyz` is
readiness (every dependency answers, and this process's reply channel is subscribed: without
it no model call can be answered). `/v1/health` is the seed's shape, kept as it is."""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import Awaitable, Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from ingress.call import Call
from ingress.services import Services
from topics.catalog import Catalog


async def models(call: Call) -> Response:
    """The model catalog in OpenAI's list shape (and the seed's `models`), plus prices,
    context window, capabilities, class, aliases and `serves`; the tenant's own providers'
    models too."""
    services = call.services
    catalog = await services.tenant_routes.catalog_for(call.principal.tenant_id)
    # Built per request only for a tenant with providers of its own (their models and
    # prices are its alone); everyone else shares the listing built once.
    body = services.model_listing if catalog is services.catalog else model_listing(catalog)
    return Response(body, media_type="application/json")


def model_listing(catalog: Catalog) -> bytes:
    """GET /v1/models's body, built once per process. OpenAI's list shape; the catalog's
    facts ride along as extra fields on each model. The same entries again under `models`:
    the seed product's Rust SDK reads that key (/work/shared/SEED-API.md)."""
    data = [
        {"id": m.id, "object": "model", "created": 0, "owned_by": m.provider,
         "kind": m.kind, "class": m.class_, "aliases": m.aliases, "serves": m.serves,
         "capabilities": m.capabilities, "context_window": m.context_window,
         "pricing": {"currency": "USD", "unit": "1M tokens",
                     "input_per_mtok": str(m.input_per_mtok),
                     "cached_input_per_mtok": str(m.cached_input_per_mtok),
                     "output_per_mtok": str(m.output_per_mtok)}}
        for m in catalog.models]
    return orjson.dumps({"object": "list", "data": data, "models": data})


def package_version() -> str:
    """The installed package's version, read once at start (`ingress/app.py`)."""
    try:
        return importlib.metadata.version("switchyard")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "0+unknown"


async def health(call: Call) -> Response:
    """Checks Kafka, Redis and PostgreSQL, with the version and uptime; 503 with `checks`
    naming what is down."""
    results, down = await _check(call.services, _dependency_checks(call.services))
    # Whole seconds: an integer decodes into a client's integer and float fields alike.
    uptime_s = int(time.monotonic() - call.services.started_s)
    body: dict[str, object] = {"status": "ok" if not down else "degraded",
                               "version": call.services.version, "uptime": uptime_s,
                               "uptime_seconds": uptime_s, "checks": results}
    if down:
        body["error"] = {"message": f"unavailable: {', '.join(down)}",
                         "type": "server_error", "code": "dependency_down", "param": None}
    return Response(orjson.dumps(body), status_code=503 if down else 200,
                    media_type="application/json")


async def healthz(_call: Call) -> Response:
    """Liveness: 200 while the process answers; checks no dependency."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(call: Call) -> Response:
    """Readiness: Kafka, Redis, PostgreSQL and this ingress's reply channel; 503 with
    `checks` naming what is down."""
    services = call.services
    checks = _dependency_checks(services)

    async def reply_channel() -> None:
        if not services.replies.connected:
            raise ConnectionError("not subscribed (Redis pub/sub)")

    results, down = await _check(services, {**checks, "reply_channel": reply_channel})
    return Response(orjson.dumps({"status": "not_ready" if down else "ready",
                                  "checks": results}),
                    status_code=503 if down else 200, media_type="application/json")


async def _check(services: Services, checks: dict[str, Callable[[], Awaitable[object]]]
                 ) -> tuple[dict[str, str], list[str]]:
    """Every check at once, each within `ingress.health_timeout_s`: "ok" or "down: why"."""
    timeout_s = services.settings.ingress.health_timeout_s

    async def check(name: str) -> tuple[str, str]:
        try:
            async with asyncio.timeout(timeout_s):
                await checks[name]()
            return name, "ok"
        except Exception as exc:  # any failure at all means "down"; say which and why
            return name, f"down: {type(exc).__name__}: {exc}"[:300]

    results = dict(await asyncio.gather(*(check(name) for name in checks)))
    return results, [name for name, state in results.items() if state != "ok"]


def _dependency_checks(services: Services) -> dict[str, Callable[[], Awaitable[object]]]:
    async def kafka() -> None:
        await services.producer.client.fetch_all_metadata()
        if not services.producer.client.cluster.brokers():
            raise ConnectionError("no brokers")

    async def redis_ping() -> None:
        await services.redis.ping()

    async def postgres() -> None:
        await services.pool.fetchval("SELECT 1")

    return {"kafka": kafka, "redis": redis_ping, "postgres": postgres}


async def metrics(call: Call) -> Response:
    """Prometheus metrics of this ingress process."""
    return Response(generate_latest(call.services.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
