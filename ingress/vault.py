"""Tenants' own provider keys: POST/GET /v1/vault/keys, POST /v1/vault/keys/{provider}/rotate,
DELETE /v1/vault/keys/{provider}. The tenant is the one of the bearer API key; a key sent
here is encrypted before it reaches the database and only its last four characters return.
Storage and encryption: `state/vault.py`; routers read the keys through
`workers/router/routes.py`.

The shapes are the seed product's too (/work/shared/SEED-API.md): a key object carries
`{provider, key_id, created_at, rotated_at}` (RFC 3339 times, `key_id` naming the stored
version), the listing has the keys under `keys` as well as OpenAI's `data`, and a rotate may
come without a body (the stored key re-encrypted under the active master key).

Each change is recorded in the audit trail (`ingress/audit.py`) before it is answered."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.validation import parse_body
from state import vault
from state.vault import MasterKeys
from topics.catalog import Catalog
from topics.errors import InvalidRequest

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 8  # shorter, and the last four characters shown would be most of it
MAX_KEY_CHARS = 4096  # the longest real provider keys (JWTs) are far below this
MAX_BODY_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 16
# Printable ASCII without spaces: the key ends up in an HTTP header, where a line break
# would be header injection and a stray space a confusing upstream 401.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
# Any name a key can be stored under (catalog names); anything else cannot be in the table.
_PROVIDER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_api_key(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if not MIN_KEY_CHARS <= len(value) <= MAX_KEY_CHARS:
        raise ValueError(f"must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} characters long")
    if not _KEY_CHARS.fullmatch(value):
        raise ValueError("must be printable ASCII without spaces or line breaks")
    return value


ApiKey = Annotated[str, AfterValidator(_check_api_key)]


class _Strict(BaseModel):
    # strict: a number is not a key and a list is not a config; unknown fields are typos.
    model_config = ConfigDict(extra="forbid", strict=True)


class StoreKey(_Strict):
    provider: str = Field(min_length=1, max_length=64)
    api_key: ApiKey
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("config")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        if problem := _config_problem(value, MAX_CONFIG_DEPTH):
            raise ValueError(problem)
        return value


def _config_problem(value: Any, depth: int) -> str | None:
    # PostgreSQL's jsonb refuses NUL, and orjson will not write deep nesting: both would
    # otherwise be 500s after validation.
    if isinstance(value, str):
        return "must not contain NUL characters" if "\x00" in value else None
    children: list[Any] = []
    if isinstance(value, dict):
        children = [*value, *value.values()]
    elif isinstance(value, list):
        children = value
    if children and depth == 0:
        return f"must not nest deeper than {MAX_CONFIG_DEPTH} levels"
    return next(filter(None, (_config_problem(c, depth - 1) for c in children)), None)


class RotateKey(_Strict):
    api_key: ApiKey | None = None  # None (or no body at all): re-encrypt the stored key


async def store_key(call: Call) -> Response:
    """Store the tenant's own key for a provider, `{provider, api_key, config}` → 201."""
    owner, keys = call.principal, _master_keys(call)
    body = parse_body(StoreKey, await read_body(call.request, MAX_BODY_BYTES))
    _check_provider(call.services.catalog, body.provider)
    stored = await vault.put_key(call.services.pool, keys, owner.tenant_id, body.provider,
                                 body.api_key, body.config)
    log.info("tenant %s stored its %s key", owner.tenant_id, body.provider)
    await call.services.audit.record(call, "vault.key_stored", target=body.provider,
                                     details=_audit_details(stored))
    return json_response(stored.public(), 201)


async def list_keys(call: Call) -> Response:
    """The tenant's stored provider keys, last four characters only."""
    _master_keys(call)
    stored = await vault.list_keys(call.services.pool, call.principal.tenant_id)
    views = [s.public() for s in stored]
    # `data` for OpenAI-style list readers, `keys` for the seed product's SDKs.
    return json_response({"object": "list", "data": views, "keys": views})


async def rotate_key(call: Call) -> Response:
    """Replace a stored provider key, `{api_key}`; with no body (or `{}`), re-encrypt the
    stored key under the active master key (a new `key_id`)."""
    owner, keys = call.principal, _master_keys(call)
    provider: str = call.request.path_params["provider"]
    raw = await read_body(call.request, MAX_BODY_BYTES)
    body = parse_body(RotateKey, raw) if raw.strip() else RotateKey()
    _check_provider(call.services.catalog, provider)
    pool = call.services.pool
    if body.api_key is None:
        stored = await vault.reencrypt_key(pool, keys, owner.tenant_id, provider)
        log.info("tenant %s re-encrypted its %s key", owner.tenant_id, provider)
    else:
        stored = await vault.rotate_key(pool, keys, owner.tenant_id, provider, body.api_key)
        log.info("tenant %s rotated its %s key", owner.tenant_id, provider)
    await call.services.audit.record(call, "vault.key_rotated", target=provider,
                                     details=_audit_details(stored))
    return json_response(stored.public())


async def delete_key(call: Call) -> Response:
    """Forget a stored provider key → `{"provider", "deleted": true}`."""
    owner = call.principal
    _master_keys(call)
    provider: str = call.request.path_params["provider"]
    # No catalog check: a key stored for a provider since dropped from the catalog must
    # still be deletable. A name no key can have is answered without a query.
    if not _PROVIDER_NAME.fullmatch(provider):
        raise vault.no_stored_key(provider[:64])
    await vault.delete_key(call.services.pool, owner.tenant_id, provider)
    log.info("tenant %s deleted its %s key", owner.tenant_id, provider)
    await call.services.audit.record(call, "vault.key_deleted", target=provider,
                                     details={"provider": provider})
    return json_response({"provider": provider, "deleted": True})


def _audit_details(stored: vault.StoredKey) -> dict[str, Any]:
    # What tells this key apart (as every vault answer shows it) and which master key sealed
    # it; never the key. `replaced`: a store over an earlier key of that provider.
    return {"provider": stored.provider, "last4": stored.last4,
            "master_key_id": stored.master_key_id, "config_fields": sorted(stored.config),
            "replaced": stored.rotated_at is not None}


def _master_keys(call: Call) -> MasterKeys:
    # The caller is authenticated before this runs (`ingress/call.py`): whether the vault is
    # configured is nobody else's business.
    if call.services.master_keys is None:
        raise vault.vault_not_configured()
    return call.services.master_keys


def _check_provider(catalog: Catalog, provider: str) -> None:
    if provider not in catalog.providers:
        raise InvalidRequest(
            f"unknown provider {provider[:64]!r}; known providers: "
            f"{', '.join(sorted(catalog.providers))}", code="unknown_provider", param="provider")
