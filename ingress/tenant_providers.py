"""Providers a tenant registers itself, the seed product's routes: POST /v1/providers/register,
GET /v1/providers, POST /v1/providers/test, PUT and DELETE /v1/providers/{provider_id}, GET
/v1/providers/{provider_id}/health. The tenant is the one of the bearer credential.

A key sent here goes to the tenant's vault (encrypted, `state/vault.py`) under the provider's
id and never comes back: answers say `has_api_key` only; probe errors have it scrubbed. Each
change is recorded in the audit trail before it is answered, dropped from this process's
route cache and broadcast to the others (`state/tenant_providers.py`), so that the routers
route to the new state on the tenant's next request.

`test` and `health` make a real probe call: the dialect's model listing (`GET {base}/models`),
which costs no tokens; `health` reuses a probe younger than `HEALTH_FRESH_S` unless asked
`?refresh=true`, and adds the circuit breakers of the provider's routes.

Shapes and routes: `topics/tenant_providers.py`; storage: `state/tenant_providers.py`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from starlette.responses import Response

from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.validation import parse_body
from state import tenant_providers as storage
from state.breakers import BreakerState
from state.revocations import publish_revocation
from topics.audit import AuditAction
from topics.errors import InvalidRequest
from topics.tenant_providers import (
    ProbeResult,
    RegisterProvider,
    TenantProvider,
    UpdateProvider,
    resolve_type,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
PROBE_TIMEOUT_S = 10.0
HEALTH_FRESH_S = 30.0  # a health read younger than this is answered without a new probe
_ERROR_CHARS = 300


async def _dialect_and_url(call: Call, type_: str, base_url: str | None) -> tuple[str, str]:
    try:
        dialect, url = resolve_type(type_, base_url, call.services.catalog)
    except ValueError as exc:
        param = "base_url" if "base_url" in str(exc) else "type"
        raise InvalidRequest(str(exc), code="invalid_provider", param=param) from None
    if not call.services.settings.ingress.provider_private_urls:
        await _public_only(url)
    return dialect, url


async def _public_only(url: str) -> None:
    """Refuse a base URL any of whose addresses is not public: a tenant must not make the
    gateway call into its own network (`ingress.provider_private_urls` off)."""
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        raise InvalidRequest(f"base_url: the host {host!r} does not resolve",
                             code="invalid_provider", param="base_url") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise InvalidRequest(f"base_url: the host {host!r} is not a public address, "
                                 "and this gateway calls public providers only",
                                 code="invalid_provider", param="base_url")


async def register_provider(call: Call) -> Response:
    """Register a provider of the tenant's own: `{name, type, api_key?, base_url?, models?,
    priority?, weight?, enabled?}` → 201 the provider (its models become the tenant's routes)."""
    tenant_id = call.principal.tenant_id
    body = parse_body(RegisterProvider, await read_body(call.request, MAX_BODY_BYTES))
    dialect, base_url = await _dialect_and_url(call, body.type, body.base_url)
    created = await storage.create_provider(
        call.services.pool, call.services.master_keys, tenant_id, name=body.name,
        type_=body.type, dialect=dialect, base_url=base_url, models=body.models,
        priority=body.priority, weight=body.weight, enabled=body.enabled,
        api_key=body.api_key)
    log.info("tenant %s registered provider %s (%s)", tenant_id, created.id, created.name)
    await _changed(call, "provider.registered", created, key_changed=body.api_key is not None)
    return json_response(view(created), 201)


async def list_providers(call: Call) -> Response:
    """The tenant's registered providers, `{"providers": [...]}` (and OpenAI's `data`)."""
    found = await storage.list_providers(call.services.pool, call.principal.tenant_id)
    views = [view(p) for p in found]
    return json_response({"object": "list", "providers": views, "data": views})


async def test_provider(call: Call) -> Response:
    """Probe a provider before registering it (same body as register) → `{success,
    latency_ms, error?}`; nothing is stored."""
    body = parse_body(RegisterProvider, await read_body(call.request, MAX_BODY_BYTES))
    dialect, base_url = await _dialect_and_url(call, body.type, body.base_url)
    return json_response(_probe_view(await probe(dialect, base_url, body.api_key)))


async def update_provider(call: Call) -> Response:
    """Change a registered provider: a partial object (left out: kept; `api_key: null`
    forgets the stored key) → the provider."""
    tenant_id, pool = call.principal.tenant_id, call.services.pool
    provider_id: str = call.request.path_params["provider_id"]
    body = parse_body(UpdateProvider, await read_body(call.request, MAX_BODY_BYTES))
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    for field in ("name", "models", "priority", "weight", "enabled"):
        if field in given:
            if getattr(body, field) is None:
                raise InvalidRequest(f"{field} cannot be null", code="invalid_field",
                                     param=field)
            changes[field] = getattr(body, field)
    if "type" in given or "base_url" in given:
        current = await storage.get_provider(pool, tenant_id, provider_id)
        type_ = body.type or current.type
        dialect, base_url = await _dialect_and_url(
            call, type_,
            body.base_url if "base_url" in given else current.base_url)
        changes |= {"type": type_, "dialect": dialect, "base_url": base_url}
    key: object = body.api_key if "api_key" in given else storage.KEEP
    updated = await storage.update_provider(pool, call.services.master_keys, tenant_id,
                                            provider_id, changes, api_key=key)
    log.info("tenant %s updated provider %s", tenant_id, provider_id)
    await _changed(call, "provider.updated", updated, key_changed="api_key" in given,
                   fields=sorted(given))
    return json_response(view(updated))


async def delete_provider(call: Call) -> Response:
    """Forget a registered provider and its key → `{"id", "deleted": true}`."""
    tenant_id = call.principal.tenant_id
    provider_id: str = call.request.path_params["provider_id"]
    gone = await storage.get_provider(call.services.pool, tenant_id, provider_id)
    await storage.delete_provider(call.services.pool, tenant_id, provider_id)
    log.info("tenant %s deleted provider %s", tenant_id, provider_id)
    await _changed(call, "provider.deleted", gone, key_changed=gone.has_key)
    return json_response({"object": "provider", "id": provider_id, "deleted": True})


async def provider_health(call: Call) -> Response:
    """A registered provider's health: its last probe (made now when older than 30 s, or
    with `?refresh=true`) and its routes' circuit breakers → `{provider_id, status,
    latency_ms?, last_check?}`."""
    tenant_id, services = call.principal.tenant_id, call.services
    provider_id: str = call.request.path_params["provider_id"]
    provider = await storage.get_provider(services.pool, tenant_id, provider_id)
    probe_result, checked = provider.last_probe, provider.last_check_at
    stale = checked is None or (datetime.now(UTC) - checked).total_seconds() > HEALTH_FRESH_S
    if provider.enabled and (stale or call.request.query_params.get("refresh") == "true"):
        key = await storage.provider_key(services.pool, services.master_keys, tenant_id,
                                         provider_id)
        probe_result = await probe(provider.dialect, provider.base_url, key)
        checked = await storage.record_probe(services.pool, tenant_id, provider_id,
                                             probe_result) or datetime.now(UTC)
    breakers = await services.breakers.views(provider.route_ids()) if provider.models else []
    opened = [b.route for b in breakers if b.state is not BreakerState.CLOSED]
    status = ("disabled" if not provider.enabled
              else "unknown" if probe_result is None
              else "unhealthy" if not probe_result.success
              else "degraded" if opened else "healthy")
    out: dict[str, Any] = {"object": "provider.health", "provider_id": provider_id,
                           "status": status,
                           "breakers": [{"route": b.route, "state": b.state.value}
                                        for b in breakers]}
    if probe_result is not None:
        out["latency_ms"] = round(probe_result.latency_ms, 3)
        out["success"] = probe_result.success
        if probe_result.error is not None:
            out["error"] = probe_result.error
    if checked is not None:
        out["last_check"] = _rfc3339(checked)
    return json_response(out)


async def probe(dialect: str, base_url: str, api_key: str | None) -> ProbeResult:
    """One real call to the provider: its model listing, in its dialect's way of sending the
    key. Never raises; an error message never contains the key."""
    headers: dict[str, str] = {}
    if api_key:
        if dialect == "anthropic":
            headers |= {"x-api-key": api_key, "anthropic-version": "2023-06-01"}
        elif dialect == "gemini":
            headers["x-goog-api-key"] = api_key
        else:
            headers["authorization"] = f"Bearer {api_key}"
    started = time.perf_counter()
    error: str | None = None
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as session, \
                session.get(f"{base_url}/models", headers=headers,
                            allow_redirects=False) as response:
            text = (await response.content.read(2048)).decode("utf-8", "replace")
            if response.status >= 400:
                error = f"HTTP {response.status}: {' '.join(text.split())}"
    except TimeoutError:
        error = f"no answer within {PROBE_TIMEOUT_S:g} s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency_ms = (time.perf_counter() - started) * 1000
    if error is not None:
        if api_key:
            error = error.replace(api_key, "[key]")
        error = error[:_ERROR_CHARS]
    return ProbeResult(success=error is None, latency_ms=latency_ms, error=error)


def view(provider: TenantProvider) -> dict[str, Any]:
    """The API's provider object: the seed's `{id, name, type, models, enabled, status}`
    (models as names) plus the rest; never the key."""
    return {"object": "provider", "id": provider.id, "name": provider.name,
            "type": provider.type, "dialect": provider.dialect, "base_url": provider.base_url,
            "models": [m.name for m in provider.models],
            "model_details": [m.public() for m in provider.models],
            "routes": provider.route_ids(), "priority": provider.priority,
            "weight": provider.weight, "enabled": provider.enabled, "status": provider.status,
            "has_api_key": provider.has_key, "created_at": _rfc3339(provider.created_at),
            "updated_at": _rfc3339(provider.updated_at)}


def _probe_view(result: ProbeResult) -> dict[str, Any]:
    out: dict[str, Any] = {"success": result.success,
                           "latency_ms": round(result.latency_ms, 3)}
    if result.error is not None:
        out["error"] = result.error
    return out


async def _changed(call: Call, action: AuditAction, provider: TenantProvider, *,
                   key_changed: bool, fields: list[str] | None = None) -> None:
    """Audit, then make every process route to the new state."""
    tenant_id = provider.tenant_id
    details: dict[str, Any] = {"name": provider.name, "type": provider.type,
                               "base_url": provider.base_url,
                               "models": [m.name for m in provider.models],
                               "enabled": provider.enabled, "key_changed": key_changed}
    if fields is not None:
        details["fields"] = fields
    await call.services.audit.record(call, action, target=provider.id, details=details)
    call.services.tenant_routes.drop_tenant(tenant_id)
    try:
        await publish_revocation(call.services.redis, "tenant", tenant_id)
    except Exception as exc:  # the change holds everywhere within the caches' TTL anyway
        log.warning("provider change of tenant %s not broadcast: %r", tenant_id, exc)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
