"""The tenant's routing policy: GET, PUT and DELETE /v1/routing/policy. The tenant is the one
of the bearer API key. PUT replaces the whole policy (fields left out take their defaults).

Every answer has one shape: {"object": "routing.policy", "source": "stored" | "default",
"updated_at": unix seconds | null, "policy": {...every field...}}; DELETE adds "deleted".
Routers see a change within SWITCHYARD_ROUTER__POLICY_CACHE_TTL_S. The policy's model and its
rules are `topics/routing_policy.py`; its storage, `state/routing_policy.py`. A PUT, and a
DELETE that deleted something, are recorded in the audit trail (`ingress/audit.py`) before
they are answered.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response

from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.validation import parse_body
from state import routing_policy as storage
from state.routing_policy import EffectivePolicy, read_policy
from topics.routing_policy import RoutingPolicy, validate_against

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a policy naming every model of the catalog is a few KiB


async def get_policy(call: Call) -> Response:
    """The tenant's effective routing policy, `"source": "stored"` or `"default"`."""
    # Read from PostgreSQL, not a cache: a PUT is visible to the next GET.
    return json_response(_view(await read_policy(call.services.pool, call.principal.tenant_id)))


async def put_policy(call: Call) -> Response:
    """Replace the tenant's routing policy (fields left out take their defaults)."""
    tenant_id = call.principal.tenant_id
    policy = parse_body(RoutingPolicy, await read_body(call.request, MAX_BODY_BYTES))
    # The tenant's own providers and models may be named too (`ingress/tenant_providers.py`).
    validate_against(policy, await call.services.tenant_routes.catalog_for(tenant_id))
    stored = await storage.put_policy(call.services.pool, tenant_id, policy)
    _forget_cache_policy(call, tenant_id)
    log.info("tenant %s replaced its routing policy", tenant_id)
    await call.services.audit.record(call, "routing_policy.updated", target=tenant_id,
                                     details={"policy": policy.public()})
    return json_response(_view(stored))


async def delete_policy(call: Call) -> Response:
    """Back to the default routing policy → `"deleted": true` or `false`."""
    tenant_id = call.principal.tenant_id
    # Idempotent: deleting the default is not an error, "deleted" says what happened.
    deleted = await storage.delete_policy(call.services.pool, tenant_id)
    _forget_cache_policy(call, tenant_id)
    if deleted:  # deleting the default changes nothing: nothing to record
        log.info("tenant %s went back to the default routing policy", tenant_id)
        await call.services.audit.record(call, "routing_policy.deleted", target=tenant_id)
    return json_response({**_view(EffectivePolicy(RoutingPolicy(), "default", None)),
                          "deleted": deleted})


def _forget_cache_policy(call: Call, tenant_id: str) -> None:
    # The policy's `cache` applies at once on this ingress (within
    # SWITCHYARD_CACHE__POLICY_CACHE_TTL_S on the others).
    if call.services.response_cache is not None:
        call.services.response_cache.forget(tenant_id)


def _view(effective: EffectivePolicy) -> dict[str, Any]:
    updated = effective.updated_at
    return {"object": "routing.policy", "source": effective.source,
            "updated_at": None if updated is None else int(updated.timestamp()),
            "policy": effective.policy.public()}
