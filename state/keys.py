"""Tenants' API keys. A key is shown once at creation; only its SHA-256 is stored.

`ingress/auth.py` checks bearer keys against them (cached briefly) and turns a key into the
request's `Principal` (`topics/identity.py`) through `admit_key`; routers re-check the key
of each request they execute with `key_status` (`workers/router/access.py`), which batch
producers publishing to Kafka cannot skip. `ingress/keys.py` serves the admin API
(create, list, rotate, revoke); `compose/cli.py` (`switchyard keys create`, `switchyard
admin create`) creates keys too. A change that must reach every cache at once is
broadcast by `state/revocations.py`; `state/last_used.py` writes `last_used_at`.

Every query on `api_keys` for a known tenant runs in `tenant_scope` (`state/tenancy.py`).
The one read before the tenant is known, authentication, goes through `switchyard_find_key`
(a definer function: state/migrations/005_isolation.sql); the CLI's keys for a named tenant
are created as the owner, in `platform_scope`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from state.tenancy import Connection, platform_scope, tenant_scope
from topics.errors import Forbidden, Unauthorized
from topics.identity import Principal, Role

KEY_PREFIX = "sy-"
PREFIX_CHARS = 8  # what `prefix` keeps: enough for a person to tell keys apart

@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as authentication needs it. Whether it may still be used (revocation, expiry,
    the tenant's suspension) is decided at each use by `admit_key`, since the record is
    cached."""

    key_id: str
    tenant_id: str
    role: Role
    allowed_models: frozenset[str] | None
    expires_at: datetime | None
    tenant_suspended: bool
    revoked: bool = False  # `find_key` never returns a revoked key; `key_status` does

    def principal(self) -> Principal:
        return Principal(tenant_id=self.tenant_id, key_id=self.key_id, role=self.role,
                         allowed_models=self.allowed_models)


def admit_key(record: KeyRecord | None, now: datetime | None = None) -> Principal:
    """The principal of a key that may be used now (or at `now`), or the 401/403 that says
    why not. The one rule for the ingress (a bearer key) and the routers (a request's key)."""
    if record is None:
        raise Unauthorized("invalid API key")
    if record.revoked:
        raise Unauthorized("this API key has been revoked", code="key_revoked")
    if record.expires_at is not None and record.expires_at <= (now or datetime.now(UTC)):
        raise Unauthorized("this API key has expired", code="key_expired")
    if record.tenant_suspended:
        raise Forbidden("this tenant is suspended", code="tenant_suspended")
    return record.principal()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as the admin API shows it: never the key, only its first characters."""

    key_id: str
    tenant_id: str
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    allowed_models: tuple[str, ...] | None
    revoked_at: datetime | None

    @property
    def preview(self) -> str:
        return f"{self.prefix}..."  # ASCII: it ends up in terminals and CSV exports

    def public(self) -> dict[str, Any]:
        """The JSON shape; datetimes become RFC 3339 strings when encoded (orjson)."""
        return {"key_id": self.key_id, "key_preview": self.preview, "name": self.name,
                "role": self.role.value, "created_at": self.created_at,
                "last_used_at": self.last_used_at, "expires_at": self.expires_at,
                "allowed_models": None if self.allowed_models is None
                else list(self.allowed_models),
                "revoked_at": self.revoked_at}


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return f"k_{uuid.uuid4().hex[:16]}"


async def ensure_tenant(conn: Connection, name: str) -> str:
    """The id of the tenant called `name`, created if missing (in a `platform_scope`)."""
    row = await conn.fetchrow(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
        f"t_{uuid.uuid4().hex[:16]}",
        name,
    )
    assert row is not None
    return str(row["id"])


async def store_key(conn: Connection, tenant_id: str, api_key: str, *,
                    role: Role = Role.TENANT_ADMIN, name: str = "") -> str:
    """Store the hash of `api_key` for the tenant (idempotent; in a `platform_scope`: the key
    may already be another tenant's); returns the key id."""
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, tenant_id, key_sha256, prefix, role, name)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (key_sha256) DO UPDATE SET revoked_at = NULL RETURNING id, tenant_id",
        new_key_id(), tenant_id, hash_key(api_key), api_key[:PREFIX_CHARS], role.value, name)
    assert row is not None
    if row["tenant_id"] != tenant_id:
        raise ValueError("that API key already belongs to another tenant")
    return str(row["id"])


async def seed_key(db: asyncpg.Pool | Connection, tenant_name: str, api_key: str, *,
                   role: Role = Role.TENANT_ADMIN, name: str = "") -> str:
    """Store `api_key` for the tenant called `tenant_name` (created if missing), as the owner
    role; returns the key id."""
    async with platform_scope(db) as conn:
        return await store_key(conn, await ensure_tenant(conn, tenant_name), api_key,
                               role=role, name=name)


async def create_key(db: asyncpg.Pool | Connection, tenant_name: str, *,
                     role: Role = Role.TENANT_ADMIN, name: str = "") -> tuple[str, str]:
    """A new key for the tenant (created if missing), as the owner role. Returns (key id, the
    key itself)."""
    api_key = new_api_key()
    return await seed_key(db, tenant_name, api_key, role=role, name=name), api_key


# Not in a tenant scope: the tenant is what the lookup finds out. The function returns the
# key's and the tenant's whole rows; take the columns authentication needs.
_FIND_KEY = ("SELECT (api_key).id, (api_key).tenant_id, (api_key).role,"
             " (api_key).allowed_models, (api_key).expires_at, (tenant).status"
             " FROM switchyard_find_key($1)")


async def find_key(pool: asyncpg.Pool, api_key: str) -> KeyRecord | None:
    """The key's record, or None when no such key exists or it was revoked."""
    row = await pool.fetchrow(_FIND_KEY, hash_key(api_key))
    return None if row is None else _record(row, revoked=False)


async def key_status(pool: asyncpg.Pool, tenant_id: str, key_id: str) -> KeyRecord | None:
    """The record of key `key_id` of `tenant_id`, revoked or not (`revoked` says); None when
    the tenant has no such key. What a router checks a request's key with."""
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "SELECT k.id, k.tenant_id, k.role, k.allowed_models, k.expires_at, t.status,"
            " k.revoked_at IS NOT NULL AS revoked"
            " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
            " WHERE k.id = $1 AND k.tenant_id = $2", key_id, tenant_id)
    return None if row is None else _record(row, revoked=row["revoked"])


def _record(row: asyncpg.Record, *, revoked: bool) -> KeyRecord:
    models = row["allowed_models"]
    return KeyRecord(key_id=row["id"], tenant_id=row["tenant_id"], role=Role(row["role"]),
                     allowed_models=None if models is None else frozenset(models),
                     expires_at=row["expires_at"], tenant_suspended=row["status"] != "active",
                     revoked=revoked)


# ------------------------------------------------------------------- the admin API's keys

_COLUMNS = ("id, tenant_id, name, role, prefix, created_at, last_used_at, expires_at,"
            " allowed_models, revoked_at")


def _api_key(row: asyncpg.Record) -> ApiKey:
    models = row["allowed_models"]
    return ApiKey(key_id=row["id"], tenant_id=row["tenant_id"], name=row["name"],
                  role=Role(row["role"]), prefix=row["prefix"], created_at=row["created_at"],
                  last_used_at=row["last_used_at"], expires_at=row["expires_at"],
                  allowed_models=None if models is None else tuple(models),
                  revoked_at=row["revoked_at"])


async def insert_key(conn: Connection, tenant_id: str, *, name: str, role: Role,
                     expires_in: timedelta | None,
                     allowed_models: Iterable[str] | None) -> tuple[ApiKey, str]:
    """A new key of `tenant_id` on `conn` (a transaction acting for that tenant). Returns
    the key's view and the key itself, which nothing stores."""
    api_key = new_api_key()
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, tenant_id, key_sha256, prefix, name, role, expires_at,"
        " allowed_models) VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval, $8)"
        f" RETURNING {_COLUMNS}",
        new_key_id(), tenant_id, hash_key(api_key), api_key[:PREFIX_CHARS], name, role.value,
        expires_in, None if allowed_models is None else list(allowed_models))
    assert row is not None
    return _api_key(row), api_key


async def add_key(pool: asyncpg.Pool, tenant_id: str, *, name: str, role: Role,
                  expires_in: timedelta | None,
                  allowed_models: Iterable[str] | None) -> tuple[ApiKey, str]:
    """A new key of the tenant: its view and the key itself (shown once)."""
    async with tenant_scope(pool, tenant_id) as conn:
        return await insert_key(conn, tenant_id, name=name, role=role, expires_in=expires_in,
                                allowed_models=allowed_models)


async def list_keys(pool: asyncpg.Pool, tenant_id: str) -> list[ApiKey]:
    """Every key of the tenant, revoked ones included, oldest first."""
    async with tenant_scope(pool, tenant_id) as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE tenant_id = $1"
                                " ORDER BY created_at, id", tenant_id)
    return [_api_key(row) for row in rows]


async def get_key(pool: asyncpg.Pool, tenant_id: str, key_id: str) -> ApiKey | None:
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_keys"
                                  " WHERE id = $1 AND tenant_id = $2", key_id, tenant_id)
    return None if row is None else _api_key(row)


async def revoke_key(pool: asyncpg.Pool, tenant_id: str, key_id: str) -> ApiKey | None:
    """Revoke the key (idempotent: a key revoked before keeps its `revoked_at`); None when
    the tenant has no such key."""
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
            f" WHERE id = $1 AND tenant_id = $2 RETURNING {_COLUMNS}", key_id, tenant_id)
    return None if row is None else _api_key(row)


async def rotate_key(pool: asyncpg.Pool, tenant_id: str, key_id: str,
                     grace: timedelta) -> tuple[ApiKey, str, ApiKey] | None:
    """A new key in place of `key_id`: the same name, role and allowed models, and the same
    lifetime if it had one (counted from now). The old key expires after `grace` (sooner if
    it expired earlier anyway). Returns (new key, the new key itself, old key); None when the
    tenant has no such key or it is revoked. One transaction: both or neither."""
    async with tenant_scope(pool, tenant_id) as conn:
        old = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1 AND tenant_id = $2"
            " AND revoked_at IS NULL FOR UPDATE", key_id, tenant_id)
        if old is None:
            return None
        lifetime = None if old["expires_at"] is None else old["expires_at"] - old["created_at"]
        new, api_key = await insert_key(conn, tenant_id, name=old["name"],
                                        role=Role(old["role"]), expires_in=lifetime,
                                        allowed_models=old["allowed_models"])
        row = await conn.fetchrow(
            "UPDATE api_keys SET expires_at = least(expires_at, now() + $3::interval)"
            f" WHERE id = $1 AND tenant_id = $2 RETURNING {_COLUMNS}", key_id, tenant_id, grace)
        assert row is not None
    return new, api_key, _api_key(row)
