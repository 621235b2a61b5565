"""The platform's tenants over HTTP: POST and GET /v1/admin/tenants, POST
/v1/admin/tenants/{tenant_id}/suspend and …/resume. Platform administrators only
(`tenants:manage`).

A new tenant comes with its first key, a `tenant_admin` one, shown once; its `limits` are its
tier's (`topics/tenants.py`), with its own `monthly_budget_usd` if given. A suspension is
stored, then broadcast (`state/revocations.py`): every key of the tenant gets 403
`tenant_suspended` on every ingress and router at once (within their caches' TTL if Redis
cannot carry it). Storage: `state/tenants.py`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.responses import Response

from ingress.actions import record_action
from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.keys import MAX_BODY_BYTES, DisplayName, broadcast, shown_once, tenant_not_found
from ingress.validation import parse_body
from state import tenants as storage
from topics.errors import Conflict
from topics.tenants import DEFAULT_TIER, Tier

_MAX_ID_CHARS = 64


class CreateTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DisplayName
    tier: Literal["trial", "growth", "scale"] = DEFAULT_TIER.value
    # A number (or a decimal string); replaces the tier's monthly budget.
    monthly_budget_usd: Decimal | None = Field(default=None, gt=0, max_digits=20,
                                               decimal_places=6, allow_inf_nan=False)


class Suspend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: StrictStr | None = Field(default=None, max_length=500)


async def create_tenant(call: Call) -> Response:
    """Create a tenant `{name, tier?, monthly_budget_usd?}` → 201 with its first
    tenant_admin key, shown this once."""
    body = parse_body(CreateTenant, await read_body(call.request, MAX_BODY_BYTES))
    tenant, key, api_key = await storage.create_tenant(
        call.services.pool, body.name, Tier(body.tier), body.monthly_budget_usd)
    await record_action(call, "tenant.created", tenant_id=tenant.tenant_id, target=tenant.tenant_id,
                  tier=tenant.tier.value)
    await record_action(call, "key.created", tenant_id=tenant.tenant_id, target=key.key_id,
                  role=key.role.value)
    return json_response({**tenant.public(), "api_keys": [shown_once(key, api_key)]}, 201)


async def list_tenants(call: Call) -> Response:
    """Every tenant of the platform, with its status, tier and limits."""
    found = await storage.list_tenants(call.services.pool)
    return json_response({"tenants": [tenant.public() for tenant in found]})


async def suspend_tenant(call: Call) -> Response:
    """Suspend a tenant `{reason?}`: its keys get 403 tenant_suspended everywhere within
    seconds."""
    tenant_id = _tenant_id(call)
    raw = await read_body(call.request, MAX_BODY_BYTES)
    body = parse_body(Suspend, raw) if raw.strip() else Suspend()
    if tenant_id == call.principal.tenant_id:
        raise Conflict("a platform administrator cannot suspend its own tenant (it would "
                       "lock itself out)", code="cannot_suspend_own_tenant", param="tenant_id")
    tenant = await storage.suspend_tenant(call.services.pool, tenant_id, body.reason)
    if tenant is None:
        raise tenant_not_found(tenant_id)
    await broadcast(call, "tenant", tenant_id)
    await record_action(call, "tenant.suspended", tenant_id=tenant_id, target=tenant_id,
                  reason=tenant.suspended_reason)
    return json_response(tenant.public())


async def resume_tenant(call: Call) -> Response:
    """Lift a tenant's suspension; its keys work again."""
    tenant_id = _tenant_id(call)
    tenant = await storage.resume_tenant(call.services.pool, tenant_id)
    if tenant is None:
        raise tenant_not_found(tenant_id)
    # Caches that hold the suspended state would refuse the keys until their TTL.
    await broadcast(call, "tenant", tenant_id)
    await record_action(call, "tenant.resumed", tenant_id=tenant_id, target=tenant_id)
    return json_response(tenant.public())


def _tenant_id(call: Call) -> str:
    tenant_id: str = call.request.path_params["tenant_id"]
    if len(tenant_id) > _MAX_ID_CHARS:
        raise tenant_not_found(tenant_id)
    return tenant_id
