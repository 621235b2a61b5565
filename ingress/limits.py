"""A tenant's rate limits over HTTP: GET and PUT /v1/tenants/{tenant_id}/limits.

Who may: reading takes `usage:read`; changing takes `limits:manage` (tenant and platform
administrators), on the caller's own tenant, or any tenant for a platform administrator
(another tenant's id is 404 `tenant_not_found`, as in `ingress/keys.py`). A platform
administrator may set any limit; a tenant administrator may lower its tenant's limits and
set its keys' limits, never above its tier's (403 `limit_above_tier`), and may not choose
the tenant's fail-open behaviour. Each change is audited (`limits.updated`) and reaches
every ingress and router at once through the revocation broadcast (a `"tenant"` one: the
processes drop what they cached of the tenant). Policy: `topics/limits.py`; storage and
enforcement: `state/limits.py`; docs/limits.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.responses import Response

from ingress.actions import record_action
from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.keys import broadcast, tenant_not_found, tenant_of
from ingress.validation import parse_body
from state import keys as key_storage
from state.limits import read_limits, write_limits
from topics.errors import Forbidden, NotFound, Unprocessable
from topics.identity import Role
from topics.limits import POLICY_FIELDS, LimitPolicy, tier_policy

MAX_BODY_BYTES = 16 * 1024
_MAX = 1_000_000_000
Limit = StrictInt | None


class PutLimits(BaseModel):
    """Fields left out stay as they are; null clears an override (back to the default)."""

    model_config = ConfigDict(extra="forbid")

    key_id: StrictStr | None = Field(default=None, min_length=1, max_length=64)
    requests_per_second: Limit = Field(default=None, ge=0, le=_MAX)
    burst: Limit = Field(default=None, ge=0, le=_MAX)
    requests_per_minute: Limit = Field(default=None, ge=0, le=_MAX)
    tokens_per_minute: Limit = Field(default=None, ge=0, le=_MAX * 1000)
    concurrent_requests: Limit = Field(default=None, ge=0, le=_MAX)
    fail_open: StrictBool | None = None


async def get_limits(call: Call) -> Response:
    """The tenant's rate limits: its tier's defaults, its overrides, its keys' own, and
    what is in force."""
    tenant_id = await tenant_of(call)
    return json_response(await _view(call, tenant_id))


async def put_limits(call: Call) -> Response:
    """Set the tenant's or one key's limits `{key_id?, requests_per_second?, burst?,
    requests_per_minute?, tokens_per_minute?, concurrent_requests?, fail_open?}` (0:
    unlimited, null: the default) → the limits as GET shows them."""
    tenant_id = await tenant_of(call)
    body = parse_body(PutLimits, await read_body(call.request, MAX_BODY_BYTES))
    stored = await read_limits(call.services.pool, tenant_id)
    if stored is None:
        raise tenant_not_found(tenant_id)
    values: dict[str, int | None] = {
        name: getattr(body, name) for name in POLICY_FIELDS if name in body.model_fields_set}
    key_id = body.key_id or ""
    if key_id and await key_storage.get_key(call.services.pool, tenant_id, key_id) is None:
        raise NotFound(f"tenant {tenant_id!r} has no API key {key_id!r}",
                       code="api_key_not_found", param="key_id")
    if key_id and "fail_open" in body.model_fields_set:
        raise Unprocessable("fail_open is the tenant's setting, not a key's",
                            code="invalid_field", param="fail_open")
    if call.principal.role is not Role.PLATFORM_ADMIN:
        if "fail_open" in body.model_fields_set:
            raise Forbidden("only a platform administrator sets fail_open",
                            code="permission_denied", param="fail_open")
        current = stored.tenant if not key_id else stored.keys.get(key_id, {})
        base = tier_policy(stored.tier) if not key_id else LimitPolicy()
        merged = base.merged({**current, **{k: v for k, v in values.items()
                                             if v is not None}})
        if key_id:  # a key's unset fields are unlimited by itself: check what is set
            merged = tier_policy(stored.tier).merged(
                {k: v for k, v in merged.public().items() if v})
        above = merged.within(tier_policy(stored.tier))
        if above:
            raise Forbidden(f"{', '.join(above)} above the {stored.tier.value} tier's; "
                            "a platform administrator may raise them",
                            code="limit_above_tier", param=above[0])
    await write_limits(call.services.pool, tenant_id, key_id, values, body.fail_open,
                       "fail_open" in body.model_fields_set)
    await broadcast(call, "tenant", tenant_id)
    changed: dict[str, Any] = {**values}
    if "fail_open" in body.model_fields_set:
        changed["fail_open"] = body.fail_open
    await record_action(call, "limits.updated", tenant_id=tenant_id,
                        target=key_id or tenant_id, changed=changed)
    return json_response(await _view(call, tenant_id))


async def _view(call: Call, tenant_id: str) -> dict[str, Any]:
    stored = await read_limits(call.services.pool, tenant_id)
    if stored is None:
        raise tenant_not_found(tenant_id)
    default_fail_open = call.services.settings.limits.fail_open
    effective = stored.effective("", default_fail_open)
    return {"tenant_id": tenant_id, "tier": stored.tier.value,
            "enabled": call.services.settings.limits.enabled,
            "tier_defaults": tier_policy(stored.tier).public(),
            "overrides": stored.tenant,
            "limits": effective.tenant.public(),
            "fail_open": effective.fail_open,
            "keys": [{"key_id": key_id, "limits": LimitPolicy().merged(fields).public()}
                     for key_id, fields in sorted(stored.keys.items())]}
