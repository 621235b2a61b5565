"""A tenant's API keys over HTTP: POST and GET /v1/tenants/{tenant_id}/api-keys, DELETE
/v1/tenants/{tenant_id}/api-keys/{key_id} (revoke), POST …/{key_id}/rotate.

Who may: the permission `keys:manage` (tenant and platform administrators), on the caller's
own tenant; a platform administrator on any tenant. Another tenant's id is answered 404
`tenant_not_found`, exactly as a tenant that does not exist: a tenant administrator learns
nothing about other tenants. No key outranks the key that creates, rotates or revokes it
(`Principal.may_grant`), and `platform_admin` keys exist only in the platform
administrator's own tenant.

A key is shown once, in the answer that creates it. A revocation or rotation reaches every
ingress and router at once through the revocation broadcast (`state/revocations.py`), and
within their caches' TTL if Redis cannot carry it. Storage: `state/keys.py`.
"""

from __future__ import annotations

import logging
import unicodedata
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.responses import Response

from ingress.actions import record_action
from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.validation import parse_body
from state import keys as storage
from state.keys import ApiKey
from state.revocations import publish_revocation
from state.runtime import outage
from state.tenants import get_tenant
from topics.errors import Conflict, Forbidden, InvalidRequest, NotFound
from topics.identity import Principal, Role
from topics.messages import RevocationKind

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_NAME_CHARS = 128
MAX_ALLOWED_MODELS = 256
MAX_EXPIRES_IN_DAYS = 3650
# How long a rotated key keeps working by default: time to roll the new key out.
DEFAULT_GRACE_PERIOD_S = 3600
MAX_GRACE_PERIOD_S = 30 * 86400
_MAX_ID_CHARS = 64  # longer than any id we make: answered without a query


def _display_name(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise ValueError("must not contain control characters")
    return value


# A name a person gives a tenant or key: shown in listings and logs, so printable.
DisplayName = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS),
                        AfterValidator(_display_name)]


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DisplayName
    role: Role = Role.MEMBER  # least privilege unless asked
    expires_in_days: StrictInt | None = Field(default=None, ge=1, le=MAX_EXPIRES_IN_DAYS)
    allowed_models: list[StrictStr] | None = Field(default=None, min_length=1,
                                                   max_length=MAX_ALLOWED_MODELS)


class RotateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period_s: StrictInt = Field(default=DEFAULT_GRACE_PERIOD_S, ge=0,
                                      le=MAX_GRACE_PERIOD_S)


async def create_api_key(call: Call) -> Response:
    """Create an API key `{name, role?, expires_in_days?, allowed_models?}` → 201 with the
    key, shown this once."""
    tenant_id = await tenant_of(call)
    body = parse_body(CreateKey, await read_body(call.request, MAX_BODY_BYTES))
    _check_grant(call.principal, body.role, tenant_id)
    models = _check_models(call, body.allowed_models)
    key, api_key = await storage.add_key(
        call.services.pool, tenant_id, name=body.name, role=body.role,
        expires_in=None if body.expires_in_days is None
        else timedelta(days=body.expires_in_days), allowed_models=models)
    await record_action(call, "key.created", tenant_id=tenant_id, target=key.key_id,
                  role=key.role.value)
    return json_response(shown_once(key, api_key), 201)


async def list_api_keys(call: Call) -> Response:
    """The tenant's API keys (previews, never the keys), revoked ones included."""
    tenant_id = await tenant_of(call)
    found = await storage.list_keys(call.services.pool, tenant_id)
    return json_response({"api_keys": [key.public() for key in found]})


async def revoke_api_key(call: Call) -> Response:
    """Revoke an API key: refused everywhere within seconds →
    `{key_id, revoked: true, revoked_at}`."""
    tenant_id = await tenant_of(call)
    key = await _manageable_key(call, tenant_id)
    if key.revoked_at is None:
        revoked = await storage.revoke_key(call.services.pool, tenant_id, key.key_id)
        assert revoked is not None  # keys are never deleted, only revoked
        key = revoked
        await broadcast(call, "key", key.key_id)
        await record_action(call, "key.revoked", tenant_id=tenant_id, target=key.key_id)
    return json_response({"key_id": key.key_id, "revoked": True, "revoked_at": key.revoked_at})


async def rotate_api_key(call: Call) -> Response:
    """Replace an API key `{grace_period_s?}` → 201 with the new key (shown once); the old
    one works until the grace period ends (default 3600 s)."""
    tenant_id = await tenant_of(call)
    raw = await read_body(call.request, MAX_BODY_BYTES)
    body = parse_body(RotateKey, raw) if raw.strip() else RotateKey()
    key = await _manageable_key(call, tenant_id)
    rotated = None
    if key.revoked_at is None:
        rotated = await storage.rotate_key(call.services.pool, tenant_id, key.key_id,
                                           timedelta(seconds=body.grace_period_s))
    if rotated is None:
        raise Conflict(f"API key {key.key_id!r} is revoked; create a new key instead",
                       code="api_key_revoked", param="key_id")
    new, api_key, old = rotated
    # The old key's new expiry must reach the caches that hold it without one.
    await broadcast(call, "key", old.key_id)
    await record_action(call, "key.rotated", tenant_id=tenant_id, target=old.key_id,
                  new_key_id=new.key_id, grace_period_s=body.grace_period_s)
    return json_response({**shown_once(new, api_key),
                          "rotated_from": {"key_id": old.key_id, "expires_at": old.expires_at}},
                         201)


def shown_once(key: ApiKey, api_key: str) -> dict[str, Any]:
    """A new key's view with the key itself: the only answer that ever carries it."""
    view = key.public()
    del view["revoked_at"], view["last_used_at"]
    return {"key_id": key.key_id, "key": api_key, **view}


async def tenant_of(call: Call) -> str:
    """The `{tenant_id}` of the path, if the caller may act for it: its own tenant, or any
    existing tenant for a platform administrator. Otherwise 404, as if it did not exist."""
    tenant_id: str = call.request.path_params["tenant_id"]
    caller = call.principal
    if tenant_id == caller.tenant_id:
        return tenant_id
    if caller.role is Role.PLATFORM_ADMIN and len(tenant_id) <= _MAX_ID_CHARS \
            and await get_tenant(call.services.pool, tenant_id) is not None:
        return tenant_id
    raise tenant_not_found(tenant_id)


def tenant_not_found(tenant_id: str) -> NotFound:
    return NotFound(f"no tenant {tenant_id[:_MAX_ID_CHARS]!r}", code="tenant_not_found",
                    param="tenant_id")


async def broadcast(call: Call, kind: RevocationKind, id: str) -> None:
    """Tell every ingress and router; the change is stored already, so an outage of Redis
    is logged, not reported: the caches' TTL still bounds it."""
    try:
        await publish_revocation(call.services.redis, kind, id)
    except Exception as exc:
        if outage(exc) is None:
            raise
        log.warning("revocation of %s %s not broadcast (%s); every process honours it "
                    "within its key cache's TTL", kind, id, type(exc).__name__)


async def _manageable_key(call: Call, tenant_id: str) -> ApiKey:
    key_id: str = call.request.path_params["key_id"]
    key = None
    if len(key_id) <= _MAX_ID_CHARS:
        key = await storage.get_key(call.services.pool, tenant_id, key_id)
    if key is None:
        raise NotFound(f"tenant {tenant_id!r} has no API key {key_id[:_MAX_ID_CHARS]!r}",
                       code="api_key_not_found", param="key_id")
    if not call.principal.may_grant(key.role):
        raise Forbidden(f"a {call.principal.role.value} key cannot manage a "
                        f"{key.role.value} key", code="role_not_grantable", param="key_id")
    return key


def _check_grant(caller: Principal, role: Role, tenant_id: str) -> None:
    if not caller.may_grant(role):
        raise Forbidden(f"a {caller.role.value} key cannot create a {role.value} key",
                        code="role_not_grantable", param="role")
    if role is Role.PLATFORM_ADMIN and tenant_id != caller.tenant_id:
        raise Forbidden("platform_admin keys belong to the platform administrators' own "
                        "tenant only", code="role_not_grantable", param="role")


def _check_models(call: Call, names: list[str] | None) -> list[str] | None:
    if names is None:
        return None
    catalog = call.services.catalog
    for i, name in enumerate(names):
        if catalog.model(name) is None:
            raise InvalidRequest(f"allowed_models.{i}: unknown model {name[:128]!r}; GET "
                                 "/v1/models lists them", code="unknown_model",
                                 param=f"allowed_models.{i}")
    return list(dict.fromkeys(names))  # listed twice is listed once
