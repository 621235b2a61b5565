"""Tenants and API keys. A key is shown once at creation; only its SHA-256 is stored.

`ingress/auth.py` checks bearer keys against them (cached briefly) through
`switchyard_find_key`, the one cross-tenant read the application role may make (it runs as the
owner: state/migrations/005_isolation.sql), and turns a key into the request's `Principal`
(`topics/identity.py`). `compose/cli.py` (`switchyard keys create`) creates them as the owner
role, in `platform_scope` (state/tenancy.py)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from state.tenancy import Connection, platform_scope
from topics.identity import Principal, Role

KEY_PREFIX = "sy-"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key that is not revoked, as authentication needs it: whether it may still be used
    (expiry, the tenant's suspension) is decided at each use, since the record is cached."""

    key_id: str
    tenant_id: str
    role: Role
    allowed_models: frozenset[str] | None
    expires_at: datetime | None
    tenant_suspended: bool

    def principal(self) -> Principal:
        return Principal(tenant_id=self.tenant_id, key_id=self.key_id, role=self.role,
                         allowed_models=self.allowed_models)


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


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


async def store_key(conn: Connection, tenant_id: str, api_key: str) -> str:
    """Store the hash of `api_key` for the tenant (idempotent; in a `platform_scope`: the key
    may already be another tenant's); returns the key id."""
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, tenant_id, key_sha256, prefix) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (key_sha256) DO UPDATE SET revoked_at = NULL RETURNING id, tenant_id",
        f"k_{uuid.uuid4().hex[:16]}",
        tenant_id,
        hash_key(api_key),
        api_key[:8],
    )
    assert row is not None
    if row["tenant_id"] != tenant_id:
        raise ValueError("that API key already belongs to another tenant")
    return str(row["id"])


async def seed_key(db: asyncpg.Pool | Connection, tenant_name: str,
                   api_key: str) -> str:
    """Store `api_key` for the tenant called `tenant_name` (created if missing), as the owner
    role; returns the key id."""
    async with platform_scope(db) as conn:
        return await store_key(conn, await ensure_tenant(conn, tenant_name), api_key)


async def create_key(db: asyncpg.Pool | Connection, tenant_name: str) -> tuple[str, str]:
    """A new key for the tenant (created if missing), as the owner role. Returns (key id, the
    key itself)."""
    api_key = new_api_key()
    return await seed_key(db, tenant_name, api_key), api_key


# Not in a tenant scope: the tenant is what the lookup finds out. The function returns the
# key's and the tenant's whole rows; take the columns authentication needs.
_FIND_KEY = ("SELECT (api_key).id, (api_key).tenant_id, (api_key).role,"
             " (api_key).allowed_models, (api_key).expires_at, (tenant).status"
             " FROM switchyard_find_key($1)")


async def find_key(pool: asyncpg.Pool, api_key: str) -> KeyRecord | None:
    """The key's record, or None when no such key exists or it was revoked."""
    row = await pool.fetchrow(_FIND_KEY, hash_key(api_key))
    if row is None:
        return None
    models = row["allowed_models"]
    return KeyRecord(key_id=row["id"], tenant_id=row["tenant_id"], role=Role(row["role"]),
                     allowed_models=None if models is None else frozenset(models),
                     expires_at=row["expires_at"], tenant_suspended=row["status"] != "active")
