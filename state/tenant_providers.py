"""Tenant-registered providers in PostgreSQL (`tenant_providers`, row-level security), their
keys in the vault (`provider_keys`, under the provider's id), and the per-tenant routes cache
shared by the ingress and the routers.

`TenantRouteCache.routes_for(tenant_id)` is the tenant's `TenantRoutes` (its catalog with
its providers' routes, `topics/tenant_providers.py` `tenant_catalog`), read through a cache
of `ttl_s`; a tenant without registrations gets the shared catalog and costs one read per
TTL. A change is published as a tenant revocation (`state/revocations.py`): every process's
cache (a `Revocable`) drops the tenant at once, and reads it again on its next request.

The other files of the feature: `topics/tenant_providers.py` (shapes, routes),
`ingress/tenant_providers.py` (the /v1/providers routes), `workers/router/routes.py` (calls).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from state.cache import ReadThroughCache
from state.tenancy import tenant_scope
from state.vault import MasterKeys, vault_not_configured
from topics.catalog import Catalog
from topics.errors import Conflict, NotFound
from topics.tenant_providers import (
    ID_PREFIX,
    DeclaredModel,
    ProbeResult,
    TenantProvider,
    TenantRoutes,
    tenant_catalog,
)

_COLUMNS = ("p.id, p.tenant_id, p.name, p.type, p.dialect, p.base_url, p.models, p.priority,"
            " p.weight, p.enabled, p.created_at, p.updated_at, p.last_check_at,"
            " p.last_success, p.last_latency_ms, p.last_error,"
            " EXISTS (SELECT 1 FROM provider_keys k WHERE k.tenant_id = p.tenant_id"
            " AND k.provider = p.id) AS has_key")
_SELECT = f"SELECT {_COLUMNS} FROM tenant_providers p"


def new_provider_id() -> str:
    return ID_PREFIX + secrets.token_hex(6)


def no_provider(provider_id: str) -> NotFound:
    return NotFound(f"no provider {provider_id[:64]!r} is registered for this tenant; "
                    "GET /v1/providers lists them", code="provider_not_found",
                    param="provider_id")


def _record(row: asyncpg.Record) -> TenantProvider:
    probe = None
    if row["last_check_at"] is not None:
        probe = ProbeResult(bool(row["last_success"]), float(row["last_latency_ms"] or 0),
                            row["last_error"])
    return TenantProvider(
        id=row["id"], tenant_id=row["tenant_id"], name=row["name"], type=row["type"],
        dialect=row["dialect"], base_url=row["base_url"],
        models=tuple(DeclaredModel.model_validate(m) for m in orjson.loads(row["models"])),
        priority=row["priority"], weight=row["weight"], enabled=row["enabled"],
        has_key=row["has_key"], created_at=row["created_at"], updated_at=row["updated_at"],
        last_check_at=row["last_check_at"], last_probe=probe)


def _models_json(models: tuple[DeclaredModel, ...]) -> str:
    return orjson.dumps([m.public() for m in models]).decode()


async def list_providers(pool: asyncpg.Pool, tenant_id: str) -> list[TenantProvider]:
    async with tenant_scope(pool, tenant_id) as conn:
        rows = await conn.fetch(f"{_SELECT} WHERE p.tenant_id = $1"
                                " ORDER BY p.priority DESC, p.created_at, p.id", tenant_id)
    return [_record(r) for r in rows]


async def get_provider(pool: asyncpg.Pool, tenant_id: str, provider_id: str) -> TenantProvider:
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(f"{_SELECT} WHERE p.tenant_id = $1 AND p.id = $2",
                                  tenant_id, provider_id)
    if row is None:
        raise no_provider(provider_id)
    return _record(row)


def _name_taken(name: str) -> Conflict:
    return Conflict(f"a provider named {name!r} is already registered for this tenant; "
                    "PUT /v1/providers/{id} changes it", code="provider_exists", param="name")


async def create_provider(pool: asyncpg.Pool, keys: MasterKeys | None, tenant_id: str, *,
                          name: str, type_: str, dialect: str, base_url: str,
                          models: tuple[DeclaredModel, ...], priority: int, weight: float,
                          enabled: bool, api_key: str | None) -> TenantProvider:
    """Store a registration and its key (encrypted, in the same transaction)."""
    if api_key is not None and keys is None:
        raise vault_not_configured()
    provider_id = new_provider_id()
    async with tenant_scope(pool, tenant_id) as conn:
        try:
            await conn.execute(
                "INSERT INTO tenant_providers (id, tenant_id, name, type, dialect, base_url,"
                " models, priority, weight, enabled) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb,"
                " $8, $9, $10)", provider_id, tenant_id, name, type_, dialect, base_url,
                _models_json(models), priority, weight, enabled)
        except asyncpg.UniqueViolationError:
            raise _name_taken(name) from None
        if api_key is not None and keys is not None:
            await _put_key(conn, keys, tenant_id, provider_id, api_key)
        row = await conn.fetchrow(f"{_SELECT} WHERE p.tenant_id = $1 AND p.id = $2",
                                  tenant_id, provider_id)
    assert row is not None
    return _record(row)


async def _put_key(conn: Any, keys: MasterKeys, tenant_id: str, provider_id: str,
                   api_key: str) -> None:
    master_id, nonce, sealed = keys.encrypt(tenant_id, provider_id, api_key)
    await conn.execute(
        "INSERT INTO provider_keys (tenant_id, provider, master_key_id, nonce, ciphertext,"
        " last4) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, provider) DO UPDATE"
        " SET master_key_id = EXCLUDED.master_key_id, nonce = EXCLUDED.nonce,"
        " ciphertext = EXCLUDED.ciphertext, last4 = EXCLUDED.last4, rotated_at = now()",
        tenant_id, provider_id, master_id, nonce, sealed, api_key[-4:])


KEEP = object()  # `update_provider`'s api_key when the key stays as it is


async def update_provider(pool: asyncpg.Pool, keys: MasterKeys | None, tenant_id: str,
                          provider_id: str, changes: dict[str, Any],
                          api_key: object = KEEP) -> TenantProvider:
    """Apply `changes` (column → value; `models` as DeclaredModels); `api_key`: a new key,
    None to forget the stored one, left out to keep it."""
    if isinstance(api_key, str) and keys is None:
        raise vault_not_configured()
    sets, args = [], [tenant_id, provider_id]
    for column, value in changes.items():
        args.append(_models_json(value) if column == "models" else value)
        sets.append(f"{column} = ${len(args)}" + ("::jsonb" if column == "models" else ""))
    async with tenant_scope(pool, tenant_id) as conn:
        try:
            done = await conn.fetchval(
                "UPDATE tenant_providers SET " + ", ".join([*sets, "updated_at = now()"])
                + " WHERE tenant_id = $1 AND id = $2 RETURNING id", *args)
        except asyncpg.UniqueViolationError:
            raise _name_taken(str(changes.get("name"))) from None
        if done is None:
            raise no_provider(provider_id)
        if isinstance(api_key, str) and keys is not None:
            await _put_key(conn, keys, tenant_id, provider_id, api_key)
        elif api_key is None:
            await conn.execute("DELETE FROM provider_keys WHERE tenant_id = $1"
                               " AND provider = $2", tenant_id, provider_id)
        row = await conn.fetchrow(f"{_SELECT} WHERE p.tenant_id = $1 AND p.id = $2",
                                  tenant_id, provider_id)
    assert row is not None
    return _record(row)


async def delete_provider(pool: asyncpg.Pool, tenant_id: str, provider_id: str) -> None:
    """Forget a registration and its key."""
    async with tenant_scope(pool, tenant_id) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM tenant_providers WHERE tenant_id = $1 AND id = $2 RETURNING id",
            tenant_id, provider_id)
        if deleted is None:
            raise no_provider(provider_id)
        await conn.execute("DELETE FROM provider_keys WHERE tenant_id = $1 AND provider = $2",
                           tenant_id, provider_id)


async def provider_key(pool: asyncpg.Pool, keys: MasterKeys | None, tenant_id: str,
                       provider_id: str) -> str | None:
    """The provider's decrypted key, for a probe; None if none is stored."""
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "SELECT master_key_id, nonce, ciphertext FROM provider_keys"
            " WHERE tenant_id = $1 AND provider = $2", tenant_id, provider_id)
    if row is None:
        return None
    if keys is None:
        raise vault_not_configured()
    return keys.decrypt(tenant_id, provider_id, row["master_key_id"], row["nonce"],
                        row["ciphertext"])


async def record_probe(pool: asyncpg.Pool, tenant_id: str, provider_id: str,
                       probe: ProbeResult) -> datetime | None:
    """Keep the last probe's outcome; when it was recorded (None: the provider is gone)."""
    async with tenant_scope(pool, tenant_id) as conn:
        at: datetime | None = await conn.fetchval(
            "UPDATE tenant_providers SET last_check_at = now(), last_success = $3,"
            " last_latency_ms = $4, last_error = $5 WHERE tenant_id = $1 AND id = $2"
            " RETURNING last_check_at",
            tenant_id, provider_id, probe.success, probe.latency_ms, probe.error)
    return at


class TenantRouteCache:
    """Each tenant's `TenantRoutes`, cached for `ttl_s` (absent registrations too), dropped
    at once by a tenant revocation (a `Revocable`, `state/revocations.py`)."""

    def __init__(self, pool: asyncpg.Pool, catalog: Catalog, *, ttl_s: float,
                 max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._catalog = catalog
        shared = TenantRoutes(catalog)

        async def load(tenant_id: str) -> TenantRoutes:
            providers = tuple(await list_providers(pool, tenant_id))
            if not providers:
                return shared
            return TenantRoutes(tenant_catalog(catalog, providers), providers)

        self._cache: ReadThroughCache[str, TenantRoutes] = ReadThroughCache(
            load, ttl_s=ttl_s, max_entries=max_entries, clock=clock)

    @property
    def shared(self) -> Catalog:
        """The catalog without any tenant's providers."""
        return self._catalog

    async def routes_for(self, tenant_id: str) -> TenantRoutes:
        return await self._cache.get(tenant_id)

    async def catalog_for(self, tenant_id: str) -> Catalog:
        return (await self._cache.get(tenant_id)).catalog

    # The revocation broadcast's hooks: a change of a tenant's providers is published as a
    # tenant revocation (`ingress/tenant_providers.py`).
    def drop_key(self, key_id: str) -> None:
        pass

    def drop_tenant(self, tenant_id: str) -> None:
        self._cache.invalidate(tenant_id)

    def drop_all(self) -> None:
        self._cache.clear()
